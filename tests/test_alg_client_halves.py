"""FedProx, SCAFFOLD, FedNova and FedDyn against independent hand computations.

The client halves are checked against a hand-written SGD loop on a one-layer model (the
cross-entropy gradient written out, the same data order as the learner's seed gives), the
server halves against their papers' formulas on hand-made updates, in float64.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import pytest
import torch

import oiafed
from oiafed import registry
from oiafed.algorithms.feddyn import FedDyn, FedDynLearner
from oiafed.algorithms.fednova import FedNova, FedNovaLearner
from oiafed.algorithms.fedprox import FedProx, FedProxLearner
from oiafed.algorithms.scaffold import Scaffold, ScaffoldLearner
from oiafed.callbacks.base import CallbackManager
from oiafed.core.aggregators import FedAvg
from oiafed.core.client_states import ClientStates
from oiafed.core.learner import Learner
from oiafed.core.types import ClientUpdate, RoundContext
from oiafed.data.arrays import ArrayDataset
from oiafed.exceptions import ConfigError
from support import Interrupt, tiny_config, without_timing

N, LR, EPOCHS, BATCH, SEED = 10, 0.1, 2, 4, 7
STEPS = EPOCHS * math.ceil(N / BATCH)  # 6 optimizer steps per fit
PARAMS = ("weight", "bias")


def tensor(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64) * scale


def start_weights() -> dict[str, torch.Tensor]:
    return {"weight": tensor(1, 2, 3), "bias": tensor(2, 2)}


def dataset() -> ArrayDataset:
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1])
    return ArrayDataset(tensor(3, N, 3), y, 2)


def fit(learner: Learner, *, tensors: dict[str, torch.Tensor] | None = None,
        values: dict[str, Any] | None = None) -> ClientUpdate:
    learner.setup(torch.nn.Linear(3, 2).double(), CallbackManager())
    return asyncio.run(learner.fit("client_0", start_weights(), dataset(), round_num=1,
                                   seed=SEED, config={"lr": LR}, tensors=tensors, values=values))


def ce_grads(w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mean cross-entropy's gradient of ``x @ W.T + b``, written out."""
    logits = x @ w["weight"].T + w["bias"]
    p = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    p = p / p.sum(dim=1, keepdim=True)
    p[torch.arange(len(y)), y] -= 1
    p = p / len(y)
    return {"weight": p.T @ x, "bias": p.sum(dim=0)}


def reference_sgd(extra_grad=lambda name, w: 0.0) -> tuple[dict[str, torch.Tensor], int]:
    """Plain SGD on ``dataset()`` from ``start_weights()``, batches in the learner's order
    (one generator seeded with the fit's seed, a permutation per epoch); ``extra_grad(name,
    w)`` is added to each gradient."""
    data, w = dataset(), start_weights()
    generator, steps = torch.Generator().manual_seed(SEED), 0
    for _ in range(EPOCHS):
        order = torch.randperm(N, generator=generator)
        for start in range(0, N, BATCH):
            index = order[start:start + BATCH]
            grads = ce_grads(w, data.x[index], data.y[index])
            w = {k: w[k] - LR * (grads[k] + extra_grad(k, w)) for k in PARAMS}
            steps += 1
    return w, steps


def assert_close(actual: torch.Tensor, expected: torch.Tensor | np.ndarray) -> None:
    np.testing.assert_allclose(actual.double().numpy(), np.asarray(expected, dtype=np.float64),
                               rtol=1e-10, atol=1e-12)


def context(sampled: tuple[str, ...], num_clients: int, states: ClientStates | None = None,
            round_num: int = 1, parameter_names: tuple[str, ...] = PARAMS) -> RoundContext:
    """The round as the trainer sets it; ``parameter_names``: the model's parameters (the
    rest of ``server_weights()`` are buffers)."""
    return RoundContext(round_num, sampled, num_clients, states or ClientStates(),
                        fit_config={"lr": LR}, parameter_names=parameter_names)


def server_weights() -> dict[str, torch.Tensor]:
    """Global weights with a float buffer and an integer buffer beside the parameters."""
    return {"weight": tensor(10, 2, 3), "bias": tensor(11, 2),
            "running_mean": tensor(12, 2), "steps": torch.tensor(5)}


def client_update(i: int, num_samples: int, **extras: Any) -> ClientUpdate:
    weights = {"weight": tensor(20 + i, 2, 3), "bias": tensor(30 + i, 2),
               "running_mean": tensor(40 + i, 2), "steps": torch.tensor(100 + i)}
    tensors = {k: v for k, v in extras.items() if isinstance(v, torch.Tensor)}
    values = {k: v for k, v in extras.items() if not isinstance(v, torch.Tensor)}
    return ClientUpdate(f"client_{i}", num_samples, {}, weights, tensors, values)


def accept_all(aggregator: Any, updates: list[ClientUpdate], global_weights) -> None:
    for update in updates:
        assert aggregator.update_problem(update, global_weights) is None


def test_the_reference_loop_takes_the_learners_steps():
    # Guards every comparison below: same batches, same order, same count.
    update = fit(Learner(epochs=EPOCHS, batch_size=BATCH, lr=LR))
    expected, steps = reference_sgd()
    assert steps == STEPS
    for k in PARAMS:
        assert_close(update.weights[k], expected[k])


# -- FedProx ------------------------------------------------------------------------------------


def test_fedprox_client_adds_the_proximal_gradient():
    mu, start = 0.7, start_weights()
    learner = FedProxLearner(epochs=EPOCHS, batch_size=BATCH, lr=LR)
    update = fit(learner, values={"mu": mu})
    expected, _ = reference_sgd(lambda k, w: mu * (w[k] - start[k]))
    plain, _ = reference_sgd()
    for k in PARAMS:
        assert_close(update.weights[k], expected[k])
        assert not torch.allclose(expected[k], plain[k])  # the term matters here
    assert update.extra_tensors == {} and update.extra_values == {}


def test_fedprox_with_mu_zero_trains_exactly_as_fedavgs_learner():
    prox = fit(FedProxLearner(epochs=EPOCHS, batch_size=BATCH, lr=LR), values={"mu": 0.0})
    plain = fit(Learner(epochs=EPOCHS, batch_size=BATCH, lr=LR))
    for k in PARAMS:
        assert torch.equal(prox.weights[k], plain.weights[k])
    assert prox.metrics == plain.metrics


def test_fedprox_server_sends_mu_and_averages_like_fedavg():
    aggregator = registry.build("aggregator", {"type": "fedprox", "args": {"mu": 0.3}})
    assert isinstance(aggregator, FedProx) and aggregator.drop_stragglers is False
    assert aggregator.configure_round(server_weights()).values == {"mu": 0.3}
    updates = [client_update(i, n) for i, n in enumerate([3, 9, 4])]
    result = aggregator.aggregate(updates, server_weights())
    for k in PARAMS:
        mean = sum(n * u.weights[k] for n, u in zip([3, 9, 4], updates, strict=True)) / 16
        assert_close(result[k], mean)


@pytest.mark.parametrize("mu", [-0.01, float("nan"), float("inf")])
def test_fedprox_refuses_a_bad_mu(mu):
    with pytest.raises(ConfigError, match=r"aggregator\.args\.mu") as caught:
        registry.build("aggregator", {"type": "fedprox", "args": {"mu": mu}}, "aggregator")
    assert caught.value.path == "aggregator.args.mu"


# -- SCAFFOLD -----------------------------------------------------------------------------------


def test_scaffold_client_corrects_gradients_and_returns_delta_c():
    c = {"weight": tensor(50, 2, 3), "bias": tensor(51, 2)}
    c_i = {"weight": tensor(52, 2, 3), "bias": tensor(53, 2)}
    sent = {**{f"c/{k}": v for k, v in c.items()}, **{f"c_i/{k}": v for k, v in c_i.items()}}
    update = fit(ScaffoldLearner(epochs=EPOCHS, batch_size=BATCH, lr=LR), tensors=sent)
    y, steps = reference_sgd(lambda k, w: c[k] - c_i[k])
    x = start_weights()
    assert set(update.extra_tensors) == set(PARAMS)
    for k in PARAMS:
        assert_close(update.weights[k], y[k])
        c_i_plus = c_i[k] - c[k] + (x[k] - y[k]) / (steps * LR)  # option II
        assert_close(update.extra_tensors[k], c_i_plus - c_i[k])


def test_scaffold_client_without_control_variates_is_plain_sgd():
    update = fit(ScaffoldLearner(epochs=EPOCHS, batch_size=BATCH, lr=LR))
    y, steps = reference_sgd()
    x = start_weights()
    for k in PARAMS:
        assert_close(update.weights[k], y[k])
        assert_close(update.extra_tensors[k], (x[k] - y[k]) / (steps * LR))


def test_scaffold_server_update_of_x_c_and_client_states():
    x, states = server_weights(), ClientStates()
    old_c = {"weight": tensor(60, 2, 3), "bias": tensor(61, 2)}
    old_c1 = {"weight": tensor(62, 2, 3), "bias": tensor(63, 2)}
    states.put("client_1", {f"c_i/{k}": v for k, v in old_c1.items()})
    deltas = [{"weight": tensor(70 + i, 2, 3), "bias": tensor(80 + i, 2)} for i in range(3)]
    updates = [client_update(i, n, **deltas[i]) for i, n in enumerate([5, 50, 9])]
    aggregator = Scaffold(server_lr=0.5)
    aggregator.load_state_dict({"c": old_c})
    aggregator.context = context(("client_0", "client_1", "client_2"), 8, states)
    accept_all(aggregator, updates, x)
    result = aggregator.aggregate(updates, x)
    for k in PARAMS:  # Algorithm 1 lines 16-17: unweighted means
        mean_dy = sum(u.weights[k] - x[k] for u in updates) / 3
        assert_close(result[k], x[k] + 0.5 * mean_dy)
        assert_close(aggregator.c[k], old_c[k] + 3 / 8 * sum(d[k] for d in deltas) / 3)
        assert_close(states.get("client_0")[f"c_i/{k}"], deltas[0][k])
        assert_close(states.get("client_1")[f"c_i/{k}"], old_c1[k] + deltas[1][k])
    assert_close(result["running_mean"], sum(u.weights["running_mean"] for u in updates) / 3)
    assert result["steps"].dtype == torch.int64
    assert set(states.get("client_2")) == {"c_i/weight", "c_i/bias"}

    aggregator.context = context(("client_1", "client_5"), 8, states, round_num=2)
    plan = aggregator.configure_round(x)
    assert set(plan.tensors) == {"c/weight", "c/bias"}
    assert_close(plan.tensors["c/bias"], aggregator.c["bias"])
    assert list(plan.client_tensors) == ["client_1"]  # sampled and with a state
    assert plan.client_tensors["client_1"] is states.get("client_1")


def test_scaffold_state_dict_round_trips():
    aggregator = Scaffold()
    aggregator.load_state_dict({"c": {"bias": tensor(1, 2)}})
    other = Scaffold()
    other.load_state_dict(aggregator.state_dict())
    assert set(other.state_dict()) == {"c"} and torch.equal(other.c["bias"], tensor(1, 2))


def test_scaffold_rejects_malformed_extras():
    x = server_weights()
    good = {"weight": tensor(1, 2, 3), "bias": tensor(2, 2)}
    aggregator = Scaffold()
    aggregator.context = context(("client_0", "client_1"), 4)
    bad = [
        {"weight": good["weight"]},  # a parameter missing
        {**good, "bias": tensor(2, 3)},
        {**good, "bias": torch.tensor([1.0, float("nan")])},
        {**good, "bias": torch.zeros(2, dtype=torch.int64)},
        {**good, "steps": torch.zeros(())},  # a buffer, not a parameter
        {**good, "running_mean": torch.zeros(2)},
        {**good, "nope": torch.zeros(2)},
    ]
    for extras in bad:
        assert aggregator.update_problem(client_update(0, 3, **extras), x) is not None
    assert "missing ['bias']" in aggregator.update_problem(client_update(1, 3, **bad[0]), x)
    assert aggregator.update_problem(client_update(0, 3, **good), x) is None
    assert aggregator.state_dict() == {"c": {}}  # a pure check: nothing learnt
    # The round's parameter names decide, not the clients' reports.
    aggregator.context = context(("client_0",), 4, parameter_names=("weight",))
    assert aggregator.update_problem(client_update(0, 3, **bad[0]), x) is None
    assert "unknown ['bias']" in aggregator.update_problem(client_update(0, 3, **good), x)
    with pytest.raises(ConfigError, match=r"aggregator\.args\.server_lr"):
        registry.build("aggregator", {"type": "scaffold", "args": {"server_lr": 0}}, "aggregator")


# -- FedNova ------------------------------------------------------------------------------------


def nova_updates(norms: list[float], sizes: list[int]) -> list[ClientUpdate]:
    return [client_update(i, n, a_norm=a)
            for i, (a, n) in enumerate(zip(norms, sizes, strict=True))]


# [3, 0, 12.5]: a client with samples took no step (a 16-mixed gradient scaler skipped them
# all). Its samples count in p_i, its a_i = 0 in tau_eff, and its d_i (0/0) is no direction.
@pytest.mark.parametrize("norms", [[3.0, 7.0, 12.5], [3.0, 0.0, 12.5]])
def test_fednova_normalises_by_a_norm(norms):
    x, sizes = server_weights(), [5, 20, 11]
    updates = nova_updates(norms, sizes)
    aggregator = FedNova()
    aggregator.context = context(("client_0", "client_1", "client_2"), 3)
    accept_all(aggregator, updates, x)
    result = aggregator.aggregate(updates, x)
    p = np.array(sizes) / sum(sizes)
    tau_eff = float(np.dot(p, norms))
    for k in PARAMS:
        xk = x[k].numpy()
        step = sum(pi * (xk - u.weights[k].numpy()) / a
                   for pi, u, a in zip(p, updates, norms, strict=True) if a > 0)
        assert_close(result[k], xk - tau_eff * step)
    fedavg = FedAvg().aggregate(updates, x)
    assert not torch.allclose(result["weight"], fedavg["weight"])  # the normalisation matters
    assert_close(result["running_mean"],
                 sum(pi * u.weights["running_mean"].numpy() for pi, u in zip(p, updates, strict=True)))


def test_fednova_equals_fedavg_when_every_client_takes_the_same_steps():
    x, sizes = server_weights(), [5, 20, 11]
    updates = nova_updates([6.0] * 3, sizes)
    aggregator = FedNova()
    aggregator.context = context(("client_0", "client_1", "client_2"), 3)
    accept_all(aggregator, updates, x)
    result = aggregator.aggregate(updates, x)
    for k in [*PARAMS, "running_mean"]:
        mean = sum(n * u.weights[k] for n, u in zip(sizes, updates, strict=True)) / sum(sizes)
        assert_close(result[k], mean)


def brute_a_norm(tau: int, rho: float) -> float:
    """||a||_1 of heavy-ball SGD: gradient k counts in every later step, rho^j-discounted."""
    return sum(sum(rho ** j for j in range(tau - k)) for k in range(tau))


def test_fednova_client_reports_a_norm_for_sgd_and_momentum():
    update = fit(FedNovaLearner(epochs=EPOCHS, batch_size=BATCH, lr=LR))
    assert update.extra_values == {"a_norm": float(STEPS)} and update.extra_tensors == {}
    rho = 0.9
    update = fit(FedNovaLearner(epochs=EPOCHS, batch_size=BATCH, lr=LR, momentum=rho))
    expected = (STEPS - rho * (1 - rho ** STEPS) / (1 - rho)) / (1 - rho)  # Section 4
    assert update.extra_values["a_norm"] == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(brute_a_norm(STEPS, rho), rel=1e-12)
    # The same from PyTorch's SGD: with a constant gradient 1, lr * ||a||_1 is the distance.
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([p], lr=LR, momentum=rho)
    for _ in range(STEPS):
        p.grad = torch.ones(1, dtype=torch.float64)
        optimizer.step()
    assert -p.item() / LR == pytest.approx(expected, rel=1e-12)


def test_fednova_client_refuses_adam():
    with pytest.raises(ConfigError, match=r"learner\.args\.optimizer"):
        fit(FedNovaLearner(optimizer="adam"))


def test_fednova_rejects_a_missing_or_bad_a_norm():
    x, aggregator = server_weights(), FedNova()
    for values in [{}, {"a_norm": -1.0}, {"a_norm": True},
                   {"a_norm": float("nan")}, {"a_norm": "2"},
                   {"a_norm": 2.0, "weight": tensor(1, 2, 3)}]:  # no tensors expected
        assert aggregator.update_problem(client_update(0, 4, **values), x) is not None
    assert aggregator.update_problem(client_update(0, 4, a_norm=2.0), x) is None
    assert aggregator.update_problem(client_update(0, 0, a_norm=0.0), x) is None
    assert aggregator.state_dict() == {}



def test_fednova_normalises_only_the_rounds_parameters():
    # "bias" named a buffer this round: FedAvg's average, as "running_mean".
    x, norms, sizes = server_weights(), [3.0, 7.0, 12.5], [5, 20, 11]
    updates = nova_updates(norms, sizes)
    aggregator = FedNova()
    aggregator.context = context(("client_0", "client_1", "client_2"), 3,
                                 parameter_names=("weight",))
    result = aggregator.aggregate(updates, x)
    p = np.array(sizes) / sum(sizes)
    tau_eff = float(np.dot(p, norms))
    xw = x["weight"].numpy()
    d = [(xw - u.weights["weight"].numpy()) / a for u, a in zip(updates, norms, strict=True)]
    assert_close(result["weight"], xw - tau_eff * sum(pi * di for pi, di in zip(p, d, strict=True)))
    for k in ["bias", "running_mean"]:
        assert_close(result[k], sum(pi * u.weights[k].numpy() for pi, u in zip(p, updates, strict=True)))


# -- FedDyn -------------------------------------------------------------------------------------


def test_feddyn_client_adds_the_dynamic_regulariser_gradient():
    alpha, x = 0.3, start_weights()
    g = {"weight": tensor(90, 2, 3), "bias": tensor(91, 2)}
    update = fit(FedDynLearner(epochs=EPOCHS, batch_size=BATCH, lr=LR),
                 tensors={f"g/{k}": v for k, v in g.items()}, values={"alpha": alpha})
    expected, _ = reference_sgd(lambda k, w: -g[k] + alpha * (w[k] - x[k]))
    for k in PARAMS:
        assert_close(update.weights[k], expected[k])
    assert update.extra_tensors == {} and update.extra_values == {}
    first = fit(FedDynLearner(epochs=EPOCHS, batch_size=BATCH, lr=LR), values={"alpha": alpha})
    expected, _ = reference_sgd(lambda k, w: alpha * (w[k] - x[k]))  # g_k = 0 at first
    for k in PARAMS:
        assert_close(first.weights[k], expected[k])


def test_feddyn_server_updates_h_weights_and_client_gradients():
    alpha, m, x, states = 0.05, 7, server_weights(), ClientStates()
    old_h = {"weight": tensor(92, 2, 3), "bias": tensor(93, 2)}
    old_g2 = {"weight": tensor(94, 2, 3), "bias": tensor(95, 2)}
    states.put("client_2", {f"g/{k}": v for k, v in old_g2.items()})
    updates = [client_update(i, n) for i, n in enumerate([4, 30, 8])]
    aggregator = FedDyn(alpha=alpha)
    aggregator.load_state_dict({"h": old_h})
    aggregator.context = context(("client_0", "client_1", "client_2"), m, states)
    accept_all(aggregator, updates, x)
    result = aggregator.aggregate(updates, x)
    for k in PARAMS:
        moved = [u.weights[k] - x[k] for u in updates]
        h = old_h[k] - alpha / m * sum(moved)
        assert_close(aggregator.h[k], h)
        assert_close(result[k], sum(u.weights[k] for u in updates) / 3 - h / alpha)
        assert_close(states.get("client_0")[f"g/{k}"], -alpha * moved[0])
        assert_close(states.get("client_2")[f"g/{k}"], old_g2[k] - alpha * moved[2])
    assert_close(result["running_mean"], sum(u.weights["running_mean"] for u in updates) / 3)

    aggregator.context = context(("client_2", "client_4"), m, states, round_num=2)
    plan = aggregator.configure_round(x)
    assert plan.values == {"alpha": alpha} and list(plan.client_tensors) == ["client_2"]


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_feddyn_refuses_a_bad_alpha(alpha):
    with pytest.raises(ConfigError, match=r"aggregator\.args\.alpha"):
        registry.build("aggregator", {"type": "feddyn", "args": {"alpha": alpha}}, "aggregator")


def test_feddyn_rejects_extras_it_does_not_expect():
    aggregator, x = FedDyn(), server_weights()
    assert aggregator.update_problem(client_update(0, 3), x) is None
    extra = client_update(0, 3, weight=tensor(1, 2, 3))
    assert aggregator.update_problem(extra, x) is not None
    assert aggregator.state_dict() == {"h": {}}


def test_feddyn_regularises_only_the_rounds_parameters():
    # "bias" named a buffer this round: no h, no g_k, the plain mean.
    alpha, m, x, states = 0.05, 7, server_weights(), ClientStates()
    updates = [client_update(i, n) for i, n in enumerate([4, 30, 8])]
    aggregator = FedDyn(alpha=alpha)
    aggregator.context = context(("client_0", "client_1", "client_2"), m, states,
                                 parameter_names=("weight",))
    result = aggregator.aggregate(updates, x)
    moved = [u.weights["weight"] - x["weight"] for u in updates]
    h = -alpha / m * sum(moved)
    assert set(aggregator.h) == {"weight"} and set(states.get("client_1")) == {"g/weight"}
    assert_close(aggregator.h["weight"], h)
    assert_close(result["weight"], sum(u.weights["weight"] for u in updates) / 3 - h / alpha)
    assert_close(result["bias"], sum(u.weights["bias"] for u in updates) / 3)


# -- configs and runs ---------------------------------------------------------------------------


def test_the_aggregator_brings_its_learner():
    assert oiafed.validate({"aggregator": {"type": "scaffold"}}).learner.type == "scaffold"
    with pytest.raises(ConfigError, match=r"learner\.type"):
        oiafed.validate({"aggregator": {"type": "scaffold"}, "learner": {"type": "fedprox"}})
    with pytest.raises(ConfigError, match=r"aggregator\.type"):
        oiafed.validate({"learner": {"type": "feddyn"}})


@pytest.mark.parametrize("algorithm", ["fedprox", "scaffold", "fednova", "feddyn"])
def test_each_algorithm_trains_end_to_end(tmp_path, algorithm):
    config = tiny_config(aggregator={"type": algorithm},
                         trainer={"args": {"rounds": 2, "clients_per_round": 3,
                                           "straggler_fraction": 0.5}},
                         learner={"args": {"lr": 0.05, "batch_size": 32, "epochs": 2}})
    result = oiafed.run(config, run_dir=tmp_path / algorithm)
    assert result.rounds_completed == 2 and result.stop_reason == "completed"
    assert math.isfinite(result.final_metrics["accuracy"])
    assert result.final_metrics["num_clients"] == 3  # no update left out
    states = sorted(p.name for p in (tmp_path / algorithm / "client_state").glob("*.safetensors"))
    if algorithm in ("scaffold", "feddyn"):
        assert states and all("@" in name for name in states)
    else:
        assert states == []


@pytest.mark.parametrize("algorithm", ["scaffold", "feddyn"])
def test_server_state_resumes_exactly(tmp_path, algorithm):
    config = tiny_config(aggregator={"type": algorithm}, runtime={"checkpoint_interval": 0},
                         trainer={"args": {"rounds": 3, "clients_per_round": 2}})
    whole = oiafed.run(config, run_dir=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        oiafed.run(config, run_dir=tmp_path / "cut", callbacks=[Interrupt(2)])
    resumed = oiafed.run(None, resume=tmp_path / "cut")
    assert without_timing(resumed.history) == without_timing(whole.history)
    for key, value in whole.weights.items():
        assert torch.equal(resumed.weights[key], value), key
