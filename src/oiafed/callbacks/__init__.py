"""Callbacks: the hook contract, the manager, and the built-in callbacks."""

from oiafed.callbacks.base import HOOKS, Callback, CallbackManager
from oiafed.callbacks.csv_logger import CSVLoggerCallback
from oiafed.callbacks.early_stopping import EarlyStoppingCallback
from oiafed.callbacks.lr_scheduler import LRSchedulerCallback
from oiafed.callbacks.model_checkpoint import ModelCheckpointCallback
from oiafed.callbacks.print_progress import PrintProgressCallback
from oiafed.callbacks.privacy_budget import PrivacyBudgetCallback
from oiafed.callbacks.progress import ProgressCallback
from oiafed.callbacks.report import ReportCallback
from oiafed.callbacks.tensorboard import TensorBoardCallback

__all__ = [
    "HOOKS",
    "CSVLoggerCallback",
    "Callback",
    "CallbackManager",
    "EarlyStoppingCallback",
    "LRSchedulerCallback",
    "ModelCheckpointCallback",
    "PrintProgressCallback",
    "PrivacyBudgetCallback",
    "ProgressCallback",
    "ReportCallback",
    "TensorBoardCallback",
]
