"""Personalized methods: each client step against a hand computation on a tiny model (one
full-batch SGD step, computed here with autograd on a copy), the server halves' personal
state, the invariants, the local test split and bad input."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import oiafed
from oiafed import registry
from oiafed.algorithms.personal import PERSONAL
from oiafed.callbacks.base import CallbackManager
from oiafed.core.client_states import ClientStates
from oiafed.core.learner import Learner
from oiafed.core.personal_eval import warn_if_costly
from oiafed.core.types import ClientUpdate, RoundContext, Weights
from oiafed.data.arrays import ArrayDataset
from oiafed.data.local_test import split_local_tests
from oiafed.exceptions import ConfigError
from oiafed.models import Layers
from support import tiny_config

LR = 0.1
HEAD = ("2.weight", "2.bias")


def tiny_model(norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)]
    if norm:
        layers.insert(1, nn.BatchNorm1d(4))
    return Layers(*layers)


def tiny_data() -> ArrayDataset:
    generator = torch.Generator().manual_seed(1)
    return ArrayDataset(torch.randn(8, 3, generator=generator),
                        torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), 3)


def weights_of(model: nn.Module, shift: float = 0.0) -> Weights:
    return {k: (v + shift if v.is_floating_point() else v).clone()
            for k, v in model.state_dict().items()}


def learner_of(method: str, model: nn.Module) -> Learner:
    learner: Learner = registry.build("learner", {"type": method, "args": {
        "lr": LR, "batch_size": 8, "epochs": 1}}, "learner")
    learner.setup(model, CallbackManager())
    return learner


def fit(learner: Learner, weights: Weights, tensors: dict[str, torch.Tensor],
        values: dict[str, Any]) -> ClientUpdate:
    return asyncio.run(learner.fit("client_0", weights, tiny_data(), round_num=1, seed=3,
                                   config={}, tensors=tensors, values=values))


def sgd_step(model: nn.Module, start: Weights, trainable: Callable[[str], bool] = lambda n: True,
             extra: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
             ) -> Weights:
    """One full-batch SGD step from ``start`` on the parameters ``trainable`` names."""
    ref = copy.deepcopy(model)
    ref.load_state_dict(start)
    ref.train()
    data = tiny_data()
    loss = F.cross_entropy(ref(data.x), data.y)
    if extra is not None:
        loss = loss + extra(ref, data.x, data.y)
    params = [(n, p) for n, p in ref.named_parameters() if trainable(n)]
    grads = torch.autograd.grad(loss, [p for _, p in params])
    new = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    for (name, p), grad in zip(params, grads, strict=True):
        new[name] = p.detach() - LR * grad
    return new


def assert_close(actual: Weights, expected: Weights, keys: Any = None) -> None:
    for key in keys or expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)


def test_fedper_trains_from_the_global_body_and_its_own_head():
    model = tiny_model()
    glob, own = weights_of(model), weights_of(model, 0.5)
    start = {**glob, **{k: own[k] for k in HEAD}}
    update = fit(learner_of("fedper", copy.deepcopy(model)), glob,
                 {PERSONAL + k: own[k] for k in HEAD}, {})
    assert_close(update.weights, sgd_step(model, start))


def test_fedrep_trains_the_head_first_then_the_body_with_that_head():
    model = tiny_model()
    glob, own = weights_of(model), weights_of(model, 0.5)
    start = {**glob, **{k: own[k] for k in HEAD}}
    after_head = sgd_step(model, start, trainable=lambda n: n in HEAD)
    expected = sgd_step(model, after_head, trainable=lambda n: n not in HEAD)
    update = fit(learner_of("fedrep", copy.deepcopy(model)), glob,
                 {PERSONAL + k: own[k] for k in HEAD},
                 {"head_keys": list(HEAD), "head_epochs": 1})
    assert_close(update.weights, expected)
    assert not torch.equal(expected["0.weight"], start["0.weight"])  # the body moved too


def test_fedrep_restores_each_parameters_own_requires_grad():
    model = tiny_model()
    model.get_submodule("0").bias.requires_grad_(False)  # frozen by the user: stays frozen
    glob = weights_of(model)
    learner = learner_of("fedrep", copy.deepcopy(model))
    update = fit(learner, glob, {}, {"head_keys": list(HEAD), "head_epochs": 1})
    flags = {n: p.requires_grad for n, p in learner._require_model().named_parameters()}
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert not flags["0.bias"] and torch.equal(update.weights["0.bias"], glob["0.bias"])
    assert not torch.equal(update.weights["0.weight"], glob["0.weight"])


def test_fedrep_evaluates_its_stored_head_on_the_global_body_untrained():
    model = tiny_model()
    glob, own = weights_of(model), weights_of(model, 0.5)
    test = ArrayDataset(tiny_data().x[:5] * 2, tiny_data().y[:5], 3)
    update = asyncio.run(learner_of("fedrep", copy.deepcopy(model)).evaluate_personal(
        "client_0", glob, tiny_data(), test, round_num=1, seed=3,
        tensors={PERSONAL + k: own[k] for k in HEAD},
        values={"head_keys": list(HEAD), "head_epochs": 5}))
    reference = copy.deepcopy(model)
    reference.load_state_dict({**glob, **{k: own[k] for k in HEAD}})
    logits = reference(test.x)
    assert update.metrics["loss"] == pytest.approx(F.cross_entropy(logits, test.y).item())


def test_fedbn_trains_with_its_own_batch_norm():
    model = tiny_model(norm=True)
    glob, own = weights_of(model), weights_of(model, 0.5)
    norm = [k for k in glob if k.startswith("1.") and glob[k].is_floating_point()]
    start = {**glob, **{k: own[k] for k in norm}}
    update = fit(learner_of("fedbn", copy.deepcopy(model)), glob,
                 {PERSONAL + k: own[k] for k in norm}, {})
    assert_close(update.weights, sgd_step(model, start))  # running statistics included


def test_ditto_trains_the_global_model_and_a_personal_one_pulled_toward_it():
    model = tiny_model()
    glob, own = weights_of(model), weights_of(model, 0.5)
    lam = 2.0
    update = fit(learner_of("ditto", copy.deepcopy(model)), glob,
                 {PERSONAL + k: v for k, v in own.items()}, {"lambda": lam,
                                                             "personal_epochs": None})
    assert_close(update.weights, sgd_step(model, glob))
    stepped = sgd_step(model, own)  # v' = v - lr grad F(v), then the proximal pull
    pull = LR * lam
    expected = {k: (stepped[k] + pull * glob[k]) / (1 + pull) for k in glob}
    personal = {k[len(PERSONAL):]: v for k, v in update.extra_tensors.items()}
    assert_close(personal, expected)


def test_a_ditto_stragglers_personal_epochs_are_its_fewer_epochs():
    model = tiny_model()
    glob, own = weights_of(model), weights_of(model, 0.5)
    learner = learner_of("ditto", copy.deepcopy(model))
    learner.epochs = 3
    update = fit(learner, glob, {PERSONAL + k: v for k, v in own.items()},
                 {"lambda": 2.0, "personal_epochs": 3, "epochs": 1})
    stepped, pull = sgd_step(model, own), LR * 2.0  # one epoch: one full-batch step
    expected = {k: (stepped[k] + pull * glob[k]) / (1 + pull) for k in glob}
    assert_close({k[len(PERSONAL):]: v for k, v in update.extra_tensors.items()}, expected)


def test_ditto_with_lambda_to_infinity_tracks_the_global_model():
    model = tiny_model()
    glob, own = weights_of(model), weights_of(model, 3.0)
    update = fit(learner_of("ditto", copy.deepcopy(model)), glob,
                 {PERSONAL + k: v for k, v in own.items()}, {"lambda": 1e12,
                                                             "personal_epochs": 3})
    personal = {k[len(PERSONAL):]: v for k, v in update.extra_tensors.items()}
    assert_close(personal, glob)


def test_no_ditto_pull_follows_a_step_the_gradient_scaler_skipped():
    # 16-mixed needs CUDA; the scaler's skip logic is the same on every device, so a CPU
    # scaler drives it here. A NaN input gives NaN gradients: the scaler skips every step.
    model = tiny_model()
    glob, own = weights_of(model), weights_of(model, 0.5)
    learner = learner_of("ditto", copy.deepcopy(model))
    learner.precision, learner._scaler = "16-mixed", torch.amp.GradScaler("cpu")
    data = tiny_data()
    data.x[0, 0] = float("nan")
    update = asyncio.run(learner.fit(
        "client_0", glob, data, round_num=1, seed=3, config={},
        tensors={PERSONAL + k: v for k, v in own.items()},
        values={"lambda": 2.0, "personal_epochs": None}))
    assert_close(update.weights, glob)  # no step taken, none counted
    assert learner.steps == 0
    assert_close({k[len(PERSONAL):]: v for k, v in update.extra_tensors.items()}, own)


def test_moon_adds_the_model_contrastive_loss():
    model = tiny_model()
    glob, prev = weights_of(model), weights_of(model, 0.3)
    mu, tau = 2.0, 0.5
    body = nn.Sequential(nn.Linear(3, 4), nn.ReLU())

    def representation(weights: Weights, x: torch.Tensor) -> torch.Tensor:
        body.load_state_dict({k: v for k, v in weights.items() if k.startswith("0.")})
        return body(x).detach()

    def contrastive(ref: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = ref[1](ref[0](x))
        positive = torch.exp(F.cosine_similarity(z, representation(glob, x)) / tau)
        negative = torch.exp(F.cosine_similarity(z, representation(prev, x)) / tau)
        return mu * (-torch.log(positive / (positive + negative))).mean()

    update = fit(learner_of("moon", copy.deepcopy(model)), glob,
                 {PERSONAL + k: v for k, v in prev.items()},
                 {"mu": mu, "temperature": tau, "head": "head"})
    expected = sgd_step(model, glob, extra=contrastive)
    assert_close(update.weights, expected)
    assert not torch.allclose(expected["0.weight"], sgd_step(model, glob)["0.weight"])


@pytest.mark.parametrize("method", ["finetune", "default"])
def test_personal_evaluation_of_the_global_model_and_after_fine_tuning(method):
    model = tiny_model()
    glob = weights_of(model)
    test = ArrayDataset(tiny_data().x[:5] * 2, tiny_data().y[:5], 3)
    update = asyncio.run(learner_of(method, copy.deepcopy(model)).evaluate_personal(
        "client_0", glob, tiny_data(), test, round_num=1, seed=3,
        values={"finetune_epochs": 1} if method == "finetune" else {}))
    reference = copy.deepcopy(model)
    reference.load_state_dict(sgd_step(model, glob) if method == "finetune" else glob)
    logits = reference(test.x)
    assert update.num_samples == 5 and update.weights == {}
    assert update.metrics["loss"] == pytest.approx(F.cross_entropy(logits, test.y).item())
    assert update.metrics["accuracy"] == pytest.approx((logits.argmax(1) == test.y).float().mean())


def test_the_server_keeps_each_clients_head_and_averages_the_rest():
    model = tiny_model()
    aggregator = registry.build("aggregator", {"type": "fedper", "args": {}}, "aggregator")
    aggregator.check_model(model)
    assert aggregator.personal_keys == HEAD
    states = ClientStates()
    aggregator.context = RoundContext(1, ("client_0", "client_1"), 2, states)
    glob = weights_of(model)
    updates = [ClientUpdate(f"client_{i}", n, {}, weights_of(model, shift))
               for i, (n, shift) in enumerate([(1, 1.0), (3, 2.0)])]
    new = aggregator.aggregate(updates, glob)
    assert_close(new, {k: glob[k] + 1.75 for k in glob})
    for update in updates:
        stored = states.get(update.client_id)
        assert stored is not None and stored.keys() == set(HEAD)
        assert_close(stored, update.weights, HEAD)
    plan = aggregator.configure_round(glob)
    assert plan.client_tensors["client_1"].keys() == {PERSONAL + k for k in HEAD}
    assert plan == aggregator.evaluation_plan(glob)


def test_a_head_the_model_does_not_have_is_an_error_naming_the_key():
    for method in ("fedper", "fedrep", "moon"):
        aggregator = registry.build("aggregator", {"type": method, "args": {"head": "classifier"}},
                                    "aggregator")
        with pytest.raises(ConfigError) as error:
            aggregator.check_model(tiny_model())
        assert error.value.path == "aggregator.args.head"
        assert "classifier" in str(error.value)


def test_local_test_sets_are_stratified_disjoint_and_drawn_from_the_seed():
    labels = np.repeat(np.arange(4), 25)
    parts = [np.arange(0, 100, 2), np.arange(1, 100, 2)]
    train, test = split_local_tests(parts, labels, 0.2, np.random.default_rng(5))
    again = split_local_tests(parts, labels, 0.2, np.random.default_rng(5))
    for part, tr, te, tr2, te2 in zip(parts, train, test, *again, strict=True):
        assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
        assert not set(tr) & set(te) and sorted([*tr, *te]) == sorted(part)
        counts = np.bincount(labels[te], minlength=4)
        assert all(abs(c - 0.2 * n) <= 0.5 for c, n in zip(counts, np.bincount(labels[part]),
                                                            strict=True))


def test_a_local_test_share_that_leaves_a_client_no_training_data_is_an_error():
    labels = np.arange(6)
    parts = [np.array([0, 1, 2, 3, 4]), np.array([5])]
    with pytest.raises(ConfigError) as error:
        split_local_tests(parts, labels, 0.9, np.random.default_rng(0))
    assert error.value.path == "data.local_test_fraction" and "client_1" in str(error.value)


def local_dp(aggregator: str) -> dict[str, Any]:
    return tiny_config(aggregator={"type": aggregator}, model={"type": "mlp"}, privacy={
        "type": "local", "args": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}})


def test_local_dp_refuses_a_client_half_that_sends_what_dp_sgd_did_not_train():
    with pytest.raises(ConfigError) as error:
        oiafed.validate(local_dp("ditto"))
    assert error.value.path == "learner.type"
    assert "privacy.type local" in str(error.value) and "'ditto'" in str(error.value)
    for allowed in ("fedper", "fednova"):  # only DP-SGD's model, or a step count, is sent
        oiafed.validate(local_dp(allowed))


def test_evaluating_all_of_a_large_federation_warns_once(caplog):
    with caplog.at_level(logging.WARNING, logger="oiafed.core.personal_eval"):
        warn_if_costly(1000, 10, 1)
        warn_if_costly(100, 5, 1)  # a small federation
        warn_if_costly(1000, 200, 1)  # a round's sample is a large share
    assert len(caplog.records) == 1
    assert "trainer.args.personal_eval_clients" in caplog.text and "eval_every" in caplog.text
