"""oiafed: federated learning for PyTorch with a training lifecycle open to callbacks."""

from oiafed.callbacks.base import Callback, CallbackManager
from oiafed.config import ExperimentConfig, load_config
from oiafed.core.aggregators import Aggregator, FedAvg
from oiafed.core.learner import Learner
from oiafed.core.trainer import Trainer
from oiafed.core.types import ClientUpdate, RoundContext, RoundPlan, RoundResult, TrainResult
from oiafed.exceptions import CallbackError, ConfigError, OiafedError, RegistryError
from oiafed.registry import build, register
from oiafed.run import run, validate
from oiafed.trained import load_model

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "Callback",
    "CallbackError",
    "CallbackManager",
    "ClientUpdate",
    "ConfigError",
    "ExperimentConfig",
    "FedAvg",
    "Learner",
    "OiafedError",
    "RegistryError",
    "RoundContext",
    "RoundPlan",
    "RoundResult",
    "TrainResult",
    "Trainer",
    "__version__",
    "build",
    "load_config",
    "load_model",
    "register",
    "run",
    "validate",
]
