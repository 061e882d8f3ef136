"""Callbacks: the hook contract, the manager, and the built-in callbacks."""

from oiafed.callbacks.base import HOOKS, Callback, CallbackManager
from oiafed.callbacks.progress import ProgressCallback

__all__ = ["HOOKS", "Callback", "CallbackManager", "ProgressCallback"]
