"""Devices, precision and determinism: where models train and evaluate, and how.

Config keys (``config.py``): ``device`` (``auto | cpu | cuda | cuda:N | mps``; ``auto``: CUDA
when available, else the CPU) is the server's (global model, evaluation, aggregation; the CPU
for ``mps``) and, by default, the learners'; ``runtime.device`` overrides it for the
learners alone (wherever they run: this process, worker processes, Ray actors, gRPC clients;
``oiafed client --device`` overrides it for one client). ``precision`` (``32 | bf16 |
16-mixed``) and ``deterministic`` apply in every process that trains. Weights always cross
process and network boundaries as CPU tensors, and a learner's update holds CPU tensors.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Mapping
from typing import Any, TypeVar, cast

import torch

from oiafed.config import DEVICE_PATTERN
from oiafed.exceptions import ConfigError

PRECISIONS = ("32", "bf16", "16-mixed")

CPU = torch.device("cpu")


@functools.cache
def _auto() -> torch.device:
    """``auto``, resolved once per process."""
    return torch.device("cuda") if torch.cuda.is_available() else CPU


def resolve_device(name: str | torch.device | None, key: str = "device") -> torch.device:
    """The ``torch.device`` a config's device name stands for, in this process.

    Raises:
        ConfigError: naming ``key``, for an unknown name or an accelerator not available here.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        return _auto()
    if not DEVICE_PATTERN.match(name):
        raise ConfigError(f"must be auto, cpu, cuda, cuda:N or mps; got {name!r}", key)
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{name} requested but torch.cuda.is_available() is False", key)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{name} requested but only {torch.cuda.device_count()} CUDA "
                              "device(s) are visible", key)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{name} requested but torch.backends.mps.is_available() is False", key)
    return device


V = TypeVar("V")


def to_device(values: Mapping[str, V], device: torch.device) -> dict[str, V]:
    """``values`` with each tensor on ``device`` (one already there is kept as it is; other
    values unchanged). Copies to an accelerator do not block; copies to the CPU do."""
    blocking = device.type == "cpu"
    return {k: cast(V, v.to(device, non_blocking=not blocking))
            if isinstance(v, torch.Tensor) else v for k, v in values.items()}


def server_device(name: str) -> torch.device:
    """The server's device for the config's ``device``: as resolved, but the CPU for MPS
    (the server sums and evaluates in float64, which MPS does not have)."""
    device = resolve_device(name)
    return CPU if device.type == "mps" else device


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """The dtype of sums kept on ``device``: float64, or float32 on MPS (which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def seed_device(device: torch.device, seed: int) -> None:
    """Seed ``device``'s own generator (randomness inside a model on an accelerator, such as
    dropout): that one GPU only, or MPS; nothing for the CPU (its generator is seeded apart)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)


def learner_device_name(cfg: Any) -> str:
    """The learners' device name: ``runtime.device``, else the top-level ``device``."""
    return str(cfg.runtime.device or cfg.device)


def round_robin(device: torch.device, index: int, count: int) -> torch.device:
    """Worker ``index``'s device when workers share ``count`` GPUs: ``cuda:(index % count)``
    for a CUDA device without an index; any other device (the CPU, ``cuda:1``) unchanged."""
    if device.type != "cuda" or device.index is not None or count < 1:
        return device
    return torch.device("cuda", index % count)


def worker_device(name: str, index: int) -> str:
    """The device name worker ``index`` of the parallel runtime trains on (resolved here)."""
    device = resolve_device(name, "runtime.device")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    return str(round_robin(device, index, count))


def device_name(device: torch.device) -> str:
    """A human name of ``device``: the GPU's name, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return _cpu_name()


@functools.cache
def _cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def check_precision(precision: str, device: torch.device, key: str = "precision") -> None:
    """Raises a ConfigError for a precision ``device`` cannot train in (16-mixed needs CUDA)."""
    if precision == "16-mixed" and device.type != "cuda":
        raise ConfigError(f"16-mixed needs a CUDA device (the device here is {device}); use bf16 "
                          "on other devices", key)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of ``precision`` on ``device`` (nothing for ``32``)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def apply_determinism(deterministic: bool) -> None:
    """With ``deterministic``: deterministic algorithms only (an op without one raises),
    cuDNN deterministic and not benchmarking, cuBLAS in its deterministic workspace mode.
    Without it, nothing is changed."""
    if not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def record(cfg: Any, server: torch.device) -> dict[str, Any]:
    """What the run folder records (``summary.json``'s ``device``)."""
    learners = cfg.runtime.device or cfg.device
    same = learners == cfg.device and learners != "mps"  # an MPS run's server is the CPU
    return {"device": str(server), "name": device_name(server),
            "learners": str(server) if same else learners,
            "precision": cfg.precision, "deterministic": cfg.deterministic}
