"""What personalized methods share: a model split into named parts, and personal state that
the server half keeps per client and sends back with the client's tasks.

A model's parts are submodules named in the config (``aggregator.args.head``: ``head`` by
default; the built-in models have a ``head`` and a ``body``). A part's keys are the
state-dict keys of its floating-point tensors.

The server half (``PersonalAggregator``) stores each trained client's personal tensors in
``RoundContext.states`` (resumable; spilled to disk beyond its memory budget, so a federation
of 10,000 clients stays bounded) and sends them, prefixed ``PERSONAL``, with the client's
next training or evaluation task. The client half (``PersonalLearner``) loads them over the
global weights: the client trains and is evaluated with its own part.
"""

from __future__ import annotations

import torch
from torch import nn

from oiafed.core.aggregators import FedAvg
from oiafed.core.learner import Learner
from oiafed.core.types import JSON, ClientUpdate, RoundPlan, Tensors, Weights
from oiafed.data.arrays import ArrayDataset
from oiafed.device import CPU
from oiafed.exceptions import ConfigError

PERSONAL = "personal/"
"""Prefix of the personal tensors a client is sent (state-dict keys after it)."""
HEAD_KEY = "aggregator.args.head"
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def head_names(head: str | list[str]) -> list[str]:
    """``aggregator.args.head`` as a list of submodule names."""
    return [head] if isinstance(head, str) else list(head)


def part_keys(model: nn.Module, names: list[str], key: str = HEAD_KEY) -> tuple[str, ...]:
    """The state-dict keys of the floating-point tensors of ``model``'s submodules ``names``.

    Raises:
        ConfigError: naming ``key`` for a name that is no submodule of ``model``.
    """
    owner = {id(t): name for name, t in model.state_dict(keep_vars=True).items()}
    keys: list[str] = []
    for name in names:
        try:
            part = model.get_submodule(name)
        except AttributeError:
            known = [n for n, _ in model.named_children()]
            raise ConfigError(f"the model ({type(model).__name__}) has no submodule {name!r}; "
                              f"its top-level modules: {known}", key) from None
        keys += [owner[id(t)] for t in part.state_dict(keep_vars=True).values()
                 if t.is_floating_point() and id(t) in owner]
    return tuple(dict.fromkeys(keys))


def norm_keys(model: nn.Module) -> tuple[str, ...]:
    """The floating-point state-dict keys of ``model``'s batch-normalization layers."""
    names = [n for n, m in model.named_modules() if isinstance(m, BATCH_NORMS)]
    return part_keys(model, names) if names else ()


def personal_tensors(tensors: Tensors) -> Tensors:
    """The personal tensors among what a client was sent, by state-dict key."""
    return {k[len(PERSONAL):]: v for k, v in tensors.items() if k.startswith(PERSONAL)}


def load_personal(model: nn.Module, tensors: Tensors) -> None:
    """Copy ``tensors`` (state-dict key -> tensor) into ``model``."""
    state = model.state_dict()
    with torch.no_grad():
        for key, tensor in tensors.items():
            state[key].copy_(tensor)


class PersonalAggregator(FedAvg):
    """A server half that keeps each client's ``personal_keys`` (set by ``check_model``) from
    its trained weights, and sends them with the client's next tasks, training and
    evaluation. The global model is FedAvg's average of everything: the start of clients
    without personal state yet."""

    personal_keys: tuple[str, ...] = ()

    def sent_values(self) -> dict[str, JSON]:
        """Values every task of this method carries (its arguments the client half needs)."""
        return {}

    def configure_round(self, global_weights: Weights) -> RoundPlan:
        ctx = self.round_context()
        parts: dict[str, Tensors] = {}
        for client_id in ctx.sampled:
            state = ctx.states.get(client_id)
            if state:
                parts[client_id] = {PERSONAL + k: v for k, v in state.items()}
        return RoundPlan(values=self.sent_values(), client_tensors=parts)

    def evaluation_plan(self, global_weights: Weights) -> RoundPlan:
        return self.configure_round(global_weights)

    def personal_part(self, update: ClientUpdate) -> Tensors:
        """What to keep of ``update`` for its client (default: its ``personal_keys``)."""
        return {k: update.weights[k].to(CPU, copy=True) for k in self.personal_keys}

    def aggregate(self, updates: list[ClientUpdate], global_weights: Weights) -> Weights:
        new = super().aggregate(updates, global_weights)
        ctx = self.round_context()
        for update in updates:
            part = self.personal_part(update)
            if part:
                ctx.states.put(update.client_id, part)
        return new


class PersonalLearner(Learner):
    """A client half that trains and is evaluated with its personal tensors loaded over the
    global weights."""

    def begin_fit(self) -> None:
        load_personal(self._require_model(), personal_tensors(self.extra_tensors))

    def personalize(self, data: ArrayDataset, generator: torch.Generator) -> None:
        load_personal(self._require_model(), personal_tensors(self.extra_tensors))
