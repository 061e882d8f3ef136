"""Local training on one client's data; the epoch hooks fire here."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from oiafed.callbacks.base import CallbackManager
from oiafed.client_state import ClientStateStore
from oiafed.core.evaluation import evaluate
from oiafed.core.types import JSON, ClientUpdate, Tensors, Weights
from oiafed.core.weights import load_weights
from oiafed.data.arrays import ArrayDataset
from oiafed.device import (
    CPU,
    accumulator_dtype,
    autocast,
    check_precision,
    seed_device,
    to_device,
)
from oiafed.exceptions import ConfigError
from oiafed.registry import register

if TYPE_CHECKING:
    from oiafed.privacy.base import PrivateTraining

OPTIMIZERS = ("sgd", "adam", "adamw")
EPOCHS = "epochs"
"""A value the trainer sends a straggler: its local epochs this round."""
LABEL_FLIP = "label_flip"
"""A value the trainer sends a client of a ``label_flip`` attack: train on flipped labels."""
TASK, EVALUATE = "task", "evaluate"
"""A round value: ``{TASK: EVALUATE}`` asks each client for its personal model's metrics on
its local test set (``Learner.evaluate_personal``) instead of an update."""


def _overrides(learner: Learner, hook: str) -> bool:
    return getattr(type(learner), hook) is not getattr(Learner, hook)


@register("learner.default")
class Learner:
    """Trains the global model on a client's data for ``epochs`` passes of minibatches.

    One learner object serves many clients in turn: ``client_id``, ``optimizer`` and
    ``round_num`` describe the client being trained. Callbacks may read and change
    ``learner.model`` and ``learner.optimizer`` (its learning rate, say) from epoch hooks.

    Device and precision: ``place`` (called by the ``ClientWorker`` from the config's
    ``device``/``runtime.device`` and ``precision``) moves the model to ``learner.device``;
    each ``fit`` moves the client's data there once (not per batch; data already there, as
    with ``runtime.resident``, is not moved) and returns CPU weights.

    Per-client state: with ``client_state: true``, ``learner.client_state`` is the dict of the
    client being trained (tensors and JSON-able values, empty the first time), loaded from
    ``learner.state_store`` (a ``ClientStateStore``) before its first epoch, its tensors on
    ``learner.device``, and stored back (on the CPU) after its last: changes in ``end_fit``
    are not kept. A subclass or an epoch hook keeps there what it needs between the rounds a
    client is sampled in. At most ``client_state_memory`` clients' states stay in memory; the
    others spill to ``client_state_dir`` (default: a temporary folder, removed at exit). The
    store belongs to this learner's process: runtimes that train a client in several processes
    need a shared ``client_state_dir`` and ``client_state_memory: 0`` (write-through). It is not
    part of a run's checkpoint (an algorithm's server half keeps resumable per-client state in
    ``RoundContext.states`` and sends each client its part). Otherwise ``client_state`` is None.

    An algorithm's client half subclasses this learner and overrides its hooks: ``begin_fit``,
    ``training_step`` (the loss; ``global_weights`` holds the round's start),
    ``before_optimizer_step`` and ``end_fit`` (the update's extras). What the server half sent
    is in ``extra_tensors``/``extra_values``; ``steps`` counts optimizer steps, ``round_lr``
    is the learning rate of the round. Hooks not overridden cost nothing.

    Args:
        epochs: local passes over the data per round.
        batch_size: minibatch size.
        lr: learning rate (a per-round ``lr`` sent by the trainer takes precedence).
        optimizer: ``sgd``, ``adam`` or ``adamw``.
        momentum: SGD momentum.
        weight_decay: L2 penalty (decoupled for adamw).
        client_state: keep per-client state in ``learner.client_state`` (see above).
        client_state_memory: most clients' states kept in memory (0: always on disk).
        client_state_dir: folder clients' states spill to (relative to the working directory).

    Raises:
        ConfigError: on a non-positive ``epochs``/``batch_size``/``lr``, an unknown optimizer or
            a negative ``client_state_memory``.

    YAML:
        learner:
          type: default
          args: {epochs: 1, batch_size: 32, lr: 0.05, optimizer: sgd}
    """

    server_half: ClassVar[str | None] = None
    """The aggregator (registry name) an algorithm's client half belongs to (None: any)."""
    extras_under_dp: ClassVar[bool] = False
    """Whether an overridden ``fit``/``train_epoch``/``end_fit`` trains only through DP-SGD
    (``super().train_epoch``) and adds to an update only what derives from the DP-SGD-trained
    model and counts, so that ``privacy.type: local`` covers it (a client half overriding them
    runs under local DP only if it declares so; its step count is checked after the fit)."""

    def __init__(
        self,
        epochs: int = 1,
        batch_size: int = 32,
        lr: float = 0.01,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        client_state: bool = False,
        client_state_memory: int = 1000,
        client_state_dir: str | None = None,
    ) -> None:
        if epochs < 1 or batch_size < 1 or lr <= 0:
            raise ConfigError(
                f"epochs and batch_size must be >= 1 and lr > 0; got epochs={epochs}, "
                f"batch_size={batch_size}, lr={lr}"
            )
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
        if momentum < 0 or weight_decay < 0:
            raise ConfigError("momentum and weight_decay must be >= 0")
        if client_state_memory < 0:
            raise ConfigError(f"client_state_memory must be >= 0, got {client_state_memory}")
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.model: nn.Module | None = None
        self.callbacks = CallbackManager()
        self.client_id: str | None = None
        self.round_num: int | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.state_store = (ClientStateStore(client_state_memory, client_state_dir)
                            if client_state else None)
        self.client_state: dict[str, Any] | None = None
        self.device: torch.device = CPU
        self.precision = "32"
        self._scaler: torch.amp.GradScaler | None = None
        self.extra_tensors: Tensors = {}
        self.extra_values: dict[str, JSON] = {}
        self.steps = 0
        self.round_lr = lr
        self._global_source: Weights = {}
        self._global_on_device: Weights | None = None
        self._custom_step = False
        self._pre_step: Callable[[], None] | None = None
        self.post_step: Callable[[], None] | None = None
        """Called after each ``optimizer.step()`` of ``train_epoch`` when set (Ditto's
        proximal pull); not after a step the 16-mixed gradient scaler skipped."""
        self.private_training: PrivateTraining | None = None
        """Sample-level DP (``privacy.type: local``): its epochs replace ``train_epoch``'s."""

    def place(self, device: torch.device, precision: str = "32") -> None:
        """Train on ``device`` in ``precision`` (``32``, ``bf16``, ``16-mixed``): the model
        moves there now (after ``setup``).

        Raises:
            ConfigError: for ``16-mixed`` on a device other than CUDA.
        """
        check_precision(precision, device)
        self.device, self.precision = device, precision
        self._scaler = torch.amp.GradScaler("cuda") if precision == "16-mixed" else None
        if self.model is not None and device != CPU:
            self.model.to(device)

    def setup(self, model: nn.Module, callbacks: CallbackManager) -> None:
        """Give the learner its own model object and the callbacks its epoch hooks run."""
        self.model = model
        self.callbacks = callbacks
        # torch.optim imports torch._dynamo when the first optimizer is made (~0.8 s of CPU):
        # here, with the rest of the start-up, rather than in the first round.
        import torch._dynamo  # noqa: F401

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("Learner.setup() must be called before training")
        return self.model

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """A fresh optimizer over ``self.model`` (optimizer state is per client and round)."""
        params = self._require_model().parameters()
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=self.momentum,
                                   weight_decay=self.weight_decay)
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss (cross-entropy); override for another objective."""
        return F.cross_entropy(logits, targets)

    async def fit(
        self,
        client_id: str,
        weights: Weights,
        data: ArrayDataset,
        *,
        round_num: int,
        seed: int,
        config: dict[str, Any] | None = None,
        tensors: Tensors | None = None,
        values: dict[str, JSON] | None = None,
    ) -> ClientUpdate:
        """Train client ``client_id`` from ``weights``; return its update.

        ``seed`` fixes data order (and any randomness in the model); ``config`` holds the
        trainer's per-round settings (``lr``); ``tensors`` and ``values`` are what the
        algorithm's server half sent this client (the round's and its own). Two values are
        the trainer's: ``epochs`` (a straggler's local epochs this round) and
        ``label_flip`` (the client trains on flipped labels: a simulated attack).
        """
        if self.model is None:
            raise RuntimeError("Learner.setup() must be called before fit()")
        generator = self._start_task(client_id, weights, round_num, seed, config, tensors,
                                     values)
        store = self.state_store
        # a stored state's tensors are on the learner's device while it trains (memory and disk
        # alike) and stored on the CPU
        self.client_state = (to_device(store.get(client_id) or {}, self.device)
                             if store is not None else None)
        metrics: dict[str, float] = {"accuracy": float("nan"), "loss": float("nan")}
        if self.extra_values.get(LABEL_FLIP):
            data = ArrayDataset(data.x, data.num_classes - 1 - data.y, data.num_classes)
        data = self._on_device(data)
        epochs = int(self.extra_values.get(EPOCHS, self.epochs))
        self.begin_fit()
        if self.private_training is not None:
            self.private_training.begin(self, seed, len(data))
        hooks = self.callbacks
        for epoch in range(1, epochs + 1):
            if hooks.implements("on_epoch_start"):
                await hooks.on_epoch_start(self, epoch)
            metrics = self.train_epoch(data, generator)
            if hooks.implements("on_epoch_end"):
                await hooks.on_epoch_end(self, epoch, metrics)
        if store is not None and self.client_state is not None:
            store.put(client_id, to_device(self.client_state, CPU))
        if self.device == CPU:
            new_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:  # updates cross process boundaries as CPU tensors
            new_weights = {k: v.detach().to(CPU, copy=True)
                           for k, v in self.model.state_dict().items()}
        update = ClientUpdate(client_id, len(data), dict(metrics), new_weights)
        self.end_fit(update)
        if self.private_training is not None:
            self.private_training.end(self, update)
        return update

    def _start_task(self, client_id: str, weights: Weights, round_num: int, seed: int,
                    config: dict[str, Any] | None, tensors: Tensors | None,
                    values: dict[str, JSON] | None) -> torch.Generator:
        """What a fit and a personal evaluation start with: the client's task in the
        learner's attributes, the model at ``weights``, a new optimizer, the hooks to call;
        the generator of the data order (seeded, as the CPU's default one)."""
        self.client_id, self.round_num = client_id, round_num
        self.extra_tensors = tensors if tensors is not None else {}
        self.extra_values = values if values is not None else {}
        self.steps = 0
        self._global_source, self._global_on_device = weights, None
        load_weights(self._require_model(), weights)
        self.round_lr = float((config or {}).get("lr", self.lr))
        self.optimizer = self.make_optimizer(self.round_lr)
        self._custom_step = _overrides(self, "training_step")
        self._pre_step = (self.before_optimizer_step
                          if _overrides(self, "before_optimizer_step") else None)
        # The CPU generator and the learner's device's only: torch.manual_seed also queues
        # lazy seeding of every accelerator backend, which costs ~0.3 ms per client.
        torch.default_generator.manual_seed(seed)
        seed_device(self.device, seed)
        return torch.Generator().manual_seed(seed)

    def _on_device(self, data: ArrayDataset) -> ArrayDataset:
        """``data`` on the learner's device (moved once per task; resident data is there)."""
        if data.x.device == self.device:
            return data
        return ArrayDataset(data.x.to(self.device), data.y.to(self.device), data.num_classes)

    # -- the client half's hooks (an algorithm's learner overrides what it needs) -------------

    @property
    def global_weights(self) -> Weights:
        """The weights this fit started from (the round's global model), on ``device``."""
        if self._global_on_device is None:
            self._global_on_device = to_device(self._global_source, self.device)
        return self._global_on_device

    def begin_fit(self) -> None:
        """Before the first epoch: the model holds the global weights, the optimizer is new,
        ``extra_tensors``/``extra_values`` hold what the server half sent."""

    def training_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One minibatch's ``(loss, logits)``; default: ``loss(model(x), y)``. Override to add
        a term (FedProx's proximal term reads ``global_weights``)."""
        logits = self._require_model()(x)
        return self.loss(logits, y), logits

    def before_optimizer_step(self) -> None:
        """After ``backward``, before ``optimizer.step()``: gradients may be changed here
        (SCAFFOLD's correction). Called only when overridden."""

    def end_fit(self, update: ClientUpdate) -> None:
        """After the last epoch: add the algorithm's extras to ``update`` (its
        ``extra_tensors``/``extra_values``); ``steps`` holds the optimizer steps taken."""

    def personalize(self, data: ArrayDataset, generator: torch.Generator) -> None:
        """Make the model this client's personal model before it is evaluated on its local
        test set: the model holds the global weights, ``extra_tensors``/``extra_values`` what
        the server half sent for the evaluation, the optimizer is new; ``data`` is the
        client's training data. Default: the global model as it is (FedAvg)."""

    async def evaluate_personal(self, client_id: str, weights: Weights, data: ArrayDataset,
                                test: ArrayDataset, *, round_num: int, seed: int,
                                config: dict[str, Any] | None = None,
                                tensors: Tensors | None = None,
                                values: dict[str, JSON] | None = None) -> ClientUpdate:
        """Client ``client_id``'s personal model (``personalize`` from ``weights``) evaluated
        on ``test``: an update of no weights whose ``num_samples`` is ``len(test)`` and whose
        metrics are the test ``accuracy`` and ``loss``."""
        model = self._require_model()
        generator = self._start_task(client_id, weights, round_num, seed, config, tensors,
                                     values)
        data = self._on_device(data)
        # Fine-tuning for an evaluation trains a model that never leaves the client: no DP.
        private, self.private_training = self.private_training, None
        try:
            self.personalize(data, generator)
        finally:
            self.private_training = private
        metrics = evaluate(model, test, device=self.device)
        return ClientUpdate(client_id, len(test), metrics, {})

    def train_epoch(self, data: ArrayDataset, generator: torch.Generator) -> dict[str, float]:
        """One pass over ``data`` in shuffled minibatches; mean loss and accuracy."""
        if self.private_training is not None:
            return self.private_training.train_epoch(self, data, generator)
        model, optimizer, size = self._require_model(), self.optimizer, self.batch_size
        if optimizer is None:
            raise RuntimeError("train_epoch() runs inside fit(), which makes the optimizer")
        model.train()
        n = len(data)
        if n == 0:
            return {"accuracy": float("nan"), "loss": float("nan")}
        order = torch.randperm(n, generator=generator)  # on the CPU: the same on every device
        if self.device != CPU or self.precision != "32":
            return self._train_epoch_on_device(data, order)
        custom, pre_step, post_step = self._custom_step, self._pre_step, self.post_step
        loss_sum, correct = 0.0, 0
        for start in range(0, n, size):
            index = order[start:start + size]
            x, y = data.x[index], data.y[index]
            optimizer.zero_grad(set_to_none=True)
            if custom:
                loss, logits = self.training_step(x, y)
            else:
                logits = model(x)
                loss = self.loss(logits, y)
            loss.backward()
            if pre_step is not None:
                pre_step()
            optimizer.step()
            if post_step is not None:
                post_step()
            self.steps += 1
            # On the CPU, item() costs less than any tensor operation (no device to sync).
            loss_sum += loss.item() * len(index)
            correct += int((logits.argmax(dim=1) == y).sum().item())
        return {"accuracy": correct / n, "loss": loss_sum / n}

    def _train_epoch_on_device(self, data: ArrayDataset, order: torch.Tensor) -> dict[str, float]:
        """``train_epoch`` on an accelerator or in reduced precision: sums stay on the
        device (no sync per batch), autocast and, for 16-mixed, a gradient scaler."""
        optimizer, size, post_step = self.optimizer, self.batch_size, self.post_step
        assert optimizer is not None
        n, scaler = len(data), self._scaler
        order = order.to(data.x.device)
        loss_sum = torch.zeros((), dtype=accumulator_dtype(self.device), device=data.x.device)
        correct = torch.zeros((), dtype=torch.int64, device=data.x.device)
        scale = scaler.get_scale() if scaler is not None else 0.0
        for start in range(0, n, size):
            index = order[start:start + size]
            x, y = data.x[index], data.y[index]
            optimizer.zero_grad(set_to_none=True)
            with autocast(self.precision, self.device):
                loss, logits = self.training_step(x, y)
            stepped = True
            if scaler is None:
                loss.backward()
                if self._pre_step is not None:
                    self._pre_step()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                if self._pre_step is not None:
                    scaler.unscale_(optimizer)
                    self._pre_step()
                # A step the scaler skips (inf/NaN gradients) lowers its scale: not counted,
                # no post_step (one sync more than scaler.step's own).
                scaler.step(optimizer)
                scaler.update()
                new_scale = scaler.get_scale()  # 0 after ~166 skips in a row: all skipped
                stepped, scale = new_scale >= scale and new_scale > 0, new_scale
            if stepped:
                if post_step is not None:
                    post_step()
                self.steps += 1
            loss_sum += loss.detach().to(loss_sum.dtype) * len(index)
            correct += (logits.detach().argmax(dim=1) == y).sum()
        return {"accuracy": int(correct) / n, "loss": float(loss_sum) / n}
