"""Server optimizers (FedAvgM, FedAdagrad, FedAdam, FedYogi) and robust rules (median,
trimmed mean, Krum, Multi-Krum) against their papers' formulas, computed here in NumPy on
hand-made updates whose clients all differ."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import oiafed
from oiafed import registry
from oiafed.algorithms.robust import Krum, Median, MultiKrum, TrimmedMean, krum_scores
from oiafed.algorithms.server_optimizers import FedAdagrad, FedAdam, FedAvgM, FedYogi
from oiafed.core.aggregators import FedAvg, weighted_average
from oiafed.core.client_states import ClientStates
from oiafed.core.types import ClientUpdate, RoundContext
from oiafed.exceptions import ConfigError, RoundFailed
from support import Interrupt, tiny_config, without_timing

SHAPES = {"w": (3, 2), "b": (4,)}


def context(round_num: int, n: int, parameter_names: tuple[str, ...] = tuple(SHAPES)
            ) -> RoundContext:
    """Round ``round_num`` of ``n`` clients; the parameters default to ``SHAPES``' keys (the
    hand-made models have no floating buffers)."""
    return RoundContext(round_num=round_num, sampled=tuple(f"c{i}" for i in range(n)),
                        num_clients=n, states=ClientStates(), parameter_names=parameter_names)


def make_updates(seed: int, n: int, scale: float = 0.1, base: dict | None = None,
                 dtype: torch.dtype = torch.float32) -> list[ClientUpdate]:
    """``n`` updates around ``base`` (default 0), each with its own values, sample count
    and step counter."""
    gen = torch.Generator().manual_seed(seed)
    updates = []
    for i in range(n):
        weights = {k: ((base[k].double() if base else 0) + scale * torch.randn(s, generator=gen,
                                                                                 dtype=torch.float64)
                       ).to(dtype) for k, s in SHAPES.items()}
        weights["steps"] = torch.tensor(100 * seed + i, dtype=torch.int64)
        updates.append(ClientUpdate(f"c{i}", 10 + 7 * i, {}, weights))
    return updates


def start_weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(99)
    weights = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    weights["steps"] = torch.tensor(0, dtype=torch.int64)
    return weights


def numpy_mean(updates: list[ClientUpdate], key: str, weighted: bool = True) -> np.ndarray:
    c = np.array([u.num_samples if weighted else 1 for u in updates], dtype=np.float64)
    arrays = [u.weights[key].double().numpy() for u in updates]
    return sum(ci * a for ci, a in zip(c, arrays, strict=True)) / c.sum()


# -- server optimizers ---------------------------------------------------------------------------

def reference_step(kind: str, args: dict, state: dict, key: str, delta: np.ndarray) -> np.ndarray:
    """One step of the paper's update for weight ``key`` (state carried in ``state``)."""
    lr = args["server_lr"]
    if kind == "fedavgm":  # Hsu et al. 2019: v <- beta v + delta; x <- x + lr v
        v = args["momentum"] * state.get(("v", key), 0.0) + delta
        state[("v", key)] = v
        return lr * v
    beta1, tau = args["beta1"], args["tau"]  # Reddi et al. 2021, Algorithm 2
    m = beta1 * state.get(("m", key), 0.0) + (1 - beta1) * delta
    v = state.get(("v", key), np.full_like(delta, tau ** 2))
    square = delta ** 2
    if kind == "fedadagrad":
        v = v + square
    elif kind == "fedadam":
        v = args["beta2"] * v + (1 - args["beta2"]) * square
    else:
        signs = np.sign(v - square)
        state.setdefault("signs", set()).update(np.unique(signs).tolist())
        v = v - (1 - args["beta2"]) * square * signs
    state[("m", key)], state[("v", key)] = m, v
    return lr * m / (np.sqrt(v) + tau)


CASES = [
    ("fedavgm", FedAvgM, {"server_lr": 0.7, "momentum": 0.9}),
    ("fedadagrad", FedAdagrad, {"server_lr": 0.05, "beta1": 0.3, "tau": 1e-2}),
    ("fedadam", FedAdam, {"server_lr": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
    ("fedyogi", FedYogi, {"server_lr": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
]
# Round 2's updates move the weights far less than rounds 1 and 3: Yogi's sign changes.
SCALES = [0.5, 0.001, 0.3]


@pytest.mark.parametrize(("kind", "cls", "args"), CASES, ids=[c[0] for c in CASES])
def test_server_optimizers_follow_their_papers_over_rounds(kind, cls, args) -> None:
    agg = cls(**args)
    state: dict = {}
    current = start_weights()
    for round_num, scale in enumerate(SCALES, start=1):
        updates = make_updates(round_num, 4, scale, base=current)
        agg.context = context(round_num, 4)
        new = agg.aggregate(updates, current)
        for key in SHAPES:
            delta = numpy_mean(updates, key) - current[key].double().numpy()
            expected = current[key].double().numpy() + reference_step(kind, args, state, key, delta)
            assert new[key].dtype == torch.float32
            np.testing.assert_allclose(new[key].numpy(), expected, rtol=1e-6, atol=1e-7)
            # Guard: the optimizer did something FedAvg would not.
            assert not np.allclose(new[key].numpy(), numpy_mean(updates, key), atol=1e-6)
        heaviest = max(updates, key=lambda u: u.num_samples)
        assert new["steps"].dtype == torch.int64
        assert new["steps"].item() == heaviest.weights["steps"].item()
        current = new
    if kind == "fedyogi":
        assert {-1.0, 1.0} <= state["signs"]  # both branches of Yogi's update were taken


@pytest.mark.parametrize(("kind", "cls", "args"), CASES, ids=[c[0] for c in CASES])
def test_state_dict_round_trip_gives_the_same_next_step(kind, cls, args) -> None:
    first = cls(**args)
    current = start_weights()
    rounds = [make_updates(r, 3, s, base=current) for r, s in enumerate(SCALES, start=1)]
    for round_num in (1, 2):
        first.context = context(round_num, 3)
        current = first.aggregate(rounds[round_num - 1], current)
    saved = first.state_dict()
    assert saved and all(isinstance(t, torch.Tensor) for store in saved["buffers"].values()
                         for t in store.values())
    first.context = context(3, 3)
    expected = first.aggregate(rounds[2], current)  # must not change what `saved` holds
    second = cls(**args)
    second.load_state_dict(saved)
    second.context = context(3, 3)
    got = second.aggregate(rounds[2], current)
    for key in expected:
        assert torch.equal(got[key], expected[key])
    fresh = cls(**args)
    fresh.context = context(3, 3)
    assert not torch.equal(fresh.aggregate(rounds[2], current)["w"], expected["w"])  # guard


def batchnorm_weights(seed: int, base: dict | None = None) -> dict[str, torch.Tensor]:
    """A ``Linear(3, 4)`` + ``BatchNorm1d(4)`` state dict: the running statistics moved by a
    few training-mode passes (so every client's differ), its parameters moved at random."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    if base is not None:
        model.load_state_dict(base)
    with torch.no_grad():
        for _ in range(1 + seed % 3):
            model(torch.randn(8, 3) * (1 + seed))
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("kind", "cls", "args"), CASES, ids=[c[0] for c in CASES])
def test_buffers_take_the_fedavg_average_and_only_parameters_are_optimized(kind, cls, args
                                                                             ) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    names = tuple(name for name, _ in model.named_parameters())
    current = batchnorm_weights(0)
    buffers = {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert set(current) - set(names) == buffers
    agg = cls(**args)
    state: dict = {}
    for round_num in (1, 2, 3):
        updates = [ClientUpdate(f"c{i}", 5 + 3 * i, {},
                                batchnorm_weights(10 * round_num + i, current)) for i in range(3)]
        agg.context = context(round_num, 3, names)
        new = agg.aggregate(updates, current)
        fedavg = FedAvg().aggregate(updates, current)
        for key in names:
            delta = numpy_mean(updates, key) - current[key].double().numpy()
            expected = current[key].double().numpy() + reference_step(kind, args, state, key, delta)
            np.testing.assert_allclose(new[key].numpy(), expected, rtol=1e-6, atol=1e-7)
            assert not np.allclose(new[key].numpy(), fedavg[key].numpy(), atol=1e-6)  # guard
        for key in buffers:
            assert new[key].dtype == current[key].dtype
            assert torch.equal(new[key], fedavg[key]), key
        np.testing.assert_allclose(new["1.running_var"].numpy(),
                                   numpy_mean(updates, "1.running_var"), rtol=1e-6)
        assert (new["1.running_var"] > 0).all()
        # the optimizer keeps state for the parameters alone
        assert all(set(store) == set(names) for store in agg.state_dict()["buffers"].values())
        current = new
    # guard: stepping the buffers too (the fallback) would change them
    everything = cls(**args)
    everything.context = context(1, 3, ())
    updates = [ClientUpdate(f"c{i}", 5, {}, batchnorm_weights(20 + i, current)) for i in range(3)]
    assert not torch.equal(everything.aggregate(updates, current)["1.running_var"],
                           FedAvg().aggregate(updates, current)["1.running_var"])


def test_without_parameter_names_every_floating_tensor_is_optimized(caplog) -> None:
    """The documented fallback: an empty ``parameter_names`` (or no context) steps every
    floating-point tensor, with one warning."""
    args = {"server_lr": 0.7, "momentum": 0.9}
    current = start_weights()
    updates = make_updates(1, 3, 0.5, base=current)
    named = FedAvgM(**args)
    named.context = context(1, 3)
    expected = named.aggregate(updates, current)
    for ctx in (context(1, 3, ()), None):
        agg = FedAvgM(**args)
        agg.context = ctx
        with caplog.at_level(logging.WARNING, logger="oiafed.algorithms.server_optimizers"):
            caplog.clear()
            for _ in range(2):
                got = agg.aggregate(updates, current)
        assert [r.getMessage() for r in caplog.records] == [
            "FedAvgM: no parameter names in the round context; the server optimizer steps "
            "every floating-point tensor, buffers included"]
        first = FedAvgM(**args)
        first.context = ctx
        once = first.aggregate(updates, current)
        for key in expected:  # no floating buffers here: the same as with the names
            assert torch.equal(once[key], expected[key])
        assert not torch.equal(got["w"], once["w"])  # the second call used the momentum


def test_fedavgm_without_momentum_is_fedavg_bitwise_on_hand_made_updates() -> None:
    gen = torch.Generator().manual_seed(5)
    for trial in range(200):
        dtype = (torch.float32, torch.float64, torch.float16)[trial % 3]
        n = 1 + trial % 6
        magnitude = 10.0 ** float(torch.randint(-6, 4, (), generator=gen))
        current = {"w": (torch.randn(17, generator=gen) * magnitude).to(dtype)}
        updates = [ClientUpdate(f"c{i}", int(torch.randint(0, 50, (), generator=gen)) + (i == 0),
                                {}, {"w": (current["w"].double() + torch.randn(17, generator=gen)
                                           * magnitude * 10.0 ** float(
                                               torch.randint(-8, 2, (), generator=gen))).to(dtype)})
                   for i in range(n)]
        expected = FedAvg().aggregate(updates, current)["w"]
        agg = FedAvgM(server_lr=1.0, momentum=0.0)
        agg.context = context(1, n, ("w",))
        got = agg.aggregate(updates, current)["w"]
        assert got.dtype == expected.dtype
        bits = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16}
        assert torch.equal(got.view(bits[dtype]), expected.view(bits[dtype])), trial


def test_fedavgm_without_momentum_reproduces_fedavg_runs_exactly(tmp_path) -> None:
    base = tiny_config(trainer={"args": {"rounds": 4, "clients_per_round": 3}})
    fedavg = oiafed.run({**base, "aggregator": {"type": "fedavg"}}, run_dir=tmp_path / "a")
    fedavgm = oiafed.run({**base, "aggregator": {"type": "fedavgm",
                                                 "args": {"momentum": 0.0, "server_lr": 1.0}}},
                         run_dir=tmp_path / "b")
    assert without_timing(fedavgm.history) == without_timing(fedavg.history)
    for key, value in fedavg.weights.items():
        assert value.dtype == torch.float32
        assert torch.equal(fedavgm.weights[key].view(torch.int32), value.view(torch.int32))
    moving = oiafed.run({**base, "aggregator": {"type": "fedavgm"}}, run_dir=tmp_path / "c")
    assert without_timing(moving.history) != without_timing(fedavg.history)  # guard


@pytest.mark.parametrize("aggregator", [{"type": "fedadam"}, {"type": "fedavgm"}])
def test_a_resumed_run_continues_the_server_optimizer_exactly(tmp_path, aggregator) -> None:
    config = tiny_config(aggregator=aggregator, trainer={"args": {"rounds": 4}})
    whole = oiafed.run(config, run_dir=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        oiafed.run(config, run_dir=tmp_path / "cut", callbacks=[Interrupt(2)])
    resumed = oiafed.run(None, resume=tmp_path / "cut")
    assert without_timing(resumed.history) == without_timing(whole.history)
    for key, value in whole.weights.items():
        assert torch.equal(resumed.weights[key], value)


def test_unweighted_option_uses_the_plain_mean() -> None:
    current = start_weights()
    updates = make_updates(1, 3, 0.2, base=current)
    agg = FedAvgM(server_lr=1.0, momentum=0.0, weighted=False)
    agg.context = context(1, 3)
    new = agg.aggregate(updates, current)
    np.testing.assert_allclose(new["w"].numpy(), numpy_mean(updates, "w", weighted=False),
                               rtol=1e-6)


@pytest.mark.parametrize(("kind", "args", "key"), [
    ("fedavgm", {"server_lr": -0.1}, "server_lr"),
    ("fedavgm", {"server_lr": float("inf")}, "server_lr"),
    ("fedadam", {"server_lr": float("nan")}, "server_lr"),
    ("fedadam", {"server_lr": 0.0}, "server_lr"),
    ("fedavgm", {"momentum": 1.0}, "momentum"),
    ("fedadam", {"beta1": -0.1}, "beta1"),
    ("fedyogi", {"beta2": 1.0}, "beta2"),
    ("fedadagrad", {"beta1": 1.5}, "beta1"),
    ("fedyogi", {"tau": 0.0}, "tau"),
    ("fedadam", {"tau": -1e-3}, "tau"),
])
def test_bad_optimizer_arguments_name_their_key(kind, args, key) -> None:
    with pytest.raises(ConfigError) as info:
        registry.build("aggregator", {"type": kind, "args": args}, "aggregator")
    assert info.value.path == f"aggregator.args.{key}"
    assert f"aggregator.args.{key}" in str(info.value)


def test_negative_server_lr_is_refused_by_run(tmp_path) -> None:
    config = tiny_config(aggregator={"type": "fedadam", "args": {"server_lr": -1.0}})
    with pytest.raises(ConfigError, match=r"aggregator\.args\.server_lr"):
        oiafed.run(config, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_fedadagrad_takes_no_beta2() -> None:
    with pytest.raises(ConfigError, match="beta2"):
        registry.build("aggregator", {"type": "fedadagrad", "args": {"beta2": 0.9}}, "aggregator")


# -- robust aggregation ----------------------------------------------------------------------------

def stacked_numpy(updates: list[ClientUpdate], key: str) -> np.ndarray:
    return np.stack([u.weights[key].double().numpy() for u in updates])


@pytest.mark.parametrize("n", [5, 6])
def test_median_is_numpys_median(n: int) -> None:
    updates = make_updates(3, n, 1.0)
    new = Median().aggregate(updates, start_weights())
    for key in SHAPES:
        # np.median averages the two middle values for an even count
        np.testing.assert_allclose(new[key].numpy(), np.median(stacked_numpy(updates, key), axis=0),
                                   rtol=1e-6)
    assert new["steps"].item() == updates[0].weights["steps"].item()


def test_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    values = [1.0, 7.0, 3.0, 100.0]
    updates = [ClientUpdate(f"c{i}", 1, {}, {"x": torch.tensor([v])}) for i, v in enumerate(values)]
    assert Median().aggregate(updates, {"x": torch.tensor([0.0])})["x"].item() == 5.0


@pytest.mark.parametrize(("beta", "n", "k"), [(0.1, 10, 1), (0.25, 7, 1), (0.29, 100, 29),
                                              (0.49, 9, 4), (0.2, 4, 0)])
def test_trimmed_mean_drops_floor_beta_n_at_each_end(beta: float, n: int, k: int) -> None:
    updates = make_updates(4, n, 1.0)
    new = TrimmedMean(beta).aggregate(updates, start_weights())
    for key in SHAPES:
        ordered = np.sort(stacked_numpy(updates, key), axis=0)
        np.testing.assert_allclose(new[key].numpy(), ordered[k:n - k].mean(axis=0), rtol=1e-6)


def test_trimmed_mean_with_beta_0_is_the_unweighted_mean() -> None:
    updates = make_updates(6, 5, 1.0)
    new = TrimmedMean(0.0).aggregate(updates, start_weights())
    plain = weighted_average([u.weights for u in updates], [1.0] * len(updates))
    for key in SHAPES:
        np.testing.assert_allclose(new[key].numpy(), stacked_numpy(updates, key).mean(axis=0),
                                   rtol=1e-6)
        # float64 sums in another order, the same float32 values here
        assert torch.equal(new[key], plain[key])
    assert torch.equal(new["steps"], plain["steps"])
    weighted = FedAvg().aggregate(updates, start_weights())
    assert not torch.equal(new["w"], weighted["w"])  # guard: the weights differ


def test_trimmed_mean_ignores_planted_outliers() -> None:
    values = [0.0, 1.0, 2.0, 3.0, 1e6, -1e6]
    updates = [ClientUpdate(f"c{i}", 1, {}, {"x": torch.tensor([v])}) for i, v in enumerate(values)]
    assert TrimmedMean(0.2).aggregate(updates, {"x": torch.tensor([0.0])})["x"].item() == 1.5


def flat(update: ClientUpdate) -> np.ndarray:
    return np.concatenate([update.weights[k].double().numpy().ravel() for k in SHAPES])


def numpy_krum_scores(updates: list[ClientUpdate], f: int) -> list[float]:
    """Blanchard et al. 2017: sum of squared distances to the n - f - 2 closest others."""
    vectors = [flat(u) for u in updates]
    scores = []
    for i, v in enumerate(vectors):
        distances = sorted(float(((v - w) ** 2).sum()) for j, w in enumerate(vectors) if j != i)
        scores.append(sum(distances[:len(vectors) - f - 2]))
    return scores


def planted(f: int = 2) -> list[ClientUpdate]:
    """Five honest updates around a centre (one at it) and ``f`` outliers close together."""
    centre = start_weights()
    offsets = [0.0, 0.1, -0.1, 0.2, -0.2]
    updates = []
    for i, offset in enumerate(offsets):
        weights = {k: v.clone() for k, v in centre.items()}
        weights["w"][i % 3, i % 2] += offset
        weights["b"][i % 4] -= offset / 2
        updates.append(ClientUpdate(f"honest{i}", 10, {}, weights))
    for j in range(f):
        weights = {k: v + 50.0 + j * 1e-3 if v.is_floating_point() else v.clone()
                   for k, v in centre.items()}
        updates.insert(2 * j + 1, ClientUpdate(f"bad{j}", 1000, {}, weights))
    return updates


def test_krum_scores_match_the_paper() -> None:
    updates = make_updates(7, 8, 1.0)
    got = krum_scores([u.weights for u in updates], 2).tolist()
    np.testing.assert_allclose(got, numpy_krum_scores(updates, 2), rtol=1e-10)


def test_krum_picks_the_planted_honest_update_among_outliers(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="oiafed.algorithms.robust")
    updates = planted()
    agg = Krum(f=2)
    agg.context = context(1, len(updates))
    new = agg.aggregate(updates, start_weights())
    assert agg.last_selected == ["honest0"]
    assert "round 1: Krum selected honest0" in caplog.text
    for key, value in updates[0].weights.items():  # updates[0] is honest0, at the centre
        assert torch.equal(new[key], value)


def test_krum_picks_the_lowest_numpy_score_on_random_updates() -> None:
    updates = make_updates(8, 7, 1.0)
    agg = Krum(f=1)
    agg.context = context(1, 7)
    new = agg.aggregate(updates, start_weights())
    best = int(np.argmin(numpy_krum_scores(updates, 1)))
    assert agg.last_selected == [updates[best].client_id]
    assert torch.equal(new["w"], updates[best].weights["w"])
    assert new["steps"].item() == updates[best].weights["steps"].item()


def test_multi_krum_with_m_n_minus_f_averages_the_hand_selection() -> None:
    updates = planted()
    agg = MultiKrum(f=2)  # m = n - f = 5
    agg.context = context(1, len(updates))
    new = agg.aggregate(updates, start_weights())
    assert sorted(agg.last_selected) == [f"honest{i}" for i in range(5)]
    honest = [u for u in updates if u.client_id.startswith("honest")]
    for key in SHAPES:
        np.testing.assert_allclose(new[key].numpy(), stacked_numpy(honest, key).mean(axis=0),
                                   rtol=1e-6)


def test_multi_krum_with_m_matches_numpy_selection() -> None:
    updates = make_updates(9, 8, 1.0)
    agg = MultiKrum(f=1, m=3)
    agg.context = context(1, 8)
    new = agg.aggregate(updates, start_weights())
    chosen = [updates[i] for i in np.argsort(numpy_krum_scores(updates, 1), kind="stable")[:3]]
    assert agg.last_selected == [u.client_id for u in chosen]
    for key in SHAPES:
        np.testing.assert_allclose(new[key].numpy(), stacked_numpy(chosen, key).mean(axis=0),
                                   rtol=1e-6)


def test_krum_with_too_few_updates_fails_the_round() -> None:
    agg = Krum(f=1)
    agg.context = context(3, 4)
    with pytest.raises(RoundFailed, match=r"round 3: Krum with f=1 needs more than 2f\+2 = 4"):
        agg.aggregate(make_updates(1, 4), start_weights())


@pytest.mark.parametrize("kind", ["krum", "multi_krum"])
def test_f_too_large_for_the_sampled_clients_is_a_config_error(tmp_path, kind) -> None:
    config = tiny_config(aggregator={"type": kind, "args": {"f": 1}},
                         trainer={"args": {"rounds": 1, "clients_per_round": 4}})
    with pytest.raises(ConfigError) as info:
        oiafed.run(config, run_dir=tmp_path / "run")
    assert info.value.path == "aggregator.args.f"
    assert "aggregator.args.f" in str(info.value) and "samples 4" in str(info.value)
    assert not (tmp_path / "run").exists()


def test_multi_krum_m_larger_than_the_sample_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        MultiKrum(f=1, m=6).check_federation(10, 5)
    assert info.value.path == "aggregator.args.m"


@pytest.mark.parametrize(("kind", "args", "key"), [
    ("trimmed_mean", {"beta": 0.5}, "beta"),
    ("trimmed_mean", {"beta": 0.7}, "beta"),
    ("trimmed_mean", {"beta": -0.1}, "beta"),
    ("krum", {"f": -1}, "f"),
    ("multi_krum", {"f": 1, "m": 0}, "m"),
])
def test_bad_robust_arguments_name_their_key(kind, args, key) -> None:
    with pytest.raises(ConfigError) as info:
        registry.build("aggregator", {"type": kind, "args": args}, "aggregator")
    assert info.value.path == f"aggregator.args.{key}"


def test_trimmed_mean_beta_half_is_refused_by_run(tmp_path) -> None:
    config = tiny_config(aggregator={"type": "trimmed_mean", "args": {"beta": 0.5}})
    with pytest.raises(ConfigError, match=r"aggregator\.args\.beta"):
        oiafed.run(config, run_dir=tmp_path / "run")


@pytest.mark.parametrize("aggregator", [
    {"type": "median"}, {"type": "trimmed_mean", "args": {"beta": 0.2}},
    {"type": "krum", "args": {"f": 1}}, {"type": "multi_krum", "args": {"f": 1}},
])
def test_robust_rules_train_under_a_sign_flip_attack(tmp_path, aggregator) -> None:
    config = tiny_config(aggregator=aggregator, data={"type": "digits", "num_clients": 6},
                         attack={"type": "sign_flip", "args": {"clients": ["client_0"],
                                                                "scale": 5.0}},
                         learner={"args": {"lr": 0.2, "batch_size": 32}})
    result = oiafed.run(config, run_dir=tmp_path / "run")
    assert result.rounds_completed == 3
    assert result.history[-1]["accuracy"] > 0.5


def test_the_same_attack_breaks_fedavg(tmp_path) -> None:
    # Guard for the test above: the attack is strong enough to matter.
    config = tiny_config(data={"type": "digits", "num_clients": 6},
                         attack={"type": "sign_flip", "args": {"clients": ["client_0"],
                                                                "scale": 5.0}},
                         learner={"args": {"lr": 0.2, "batch_size": 32}})
    assert oiafed.run(config, run_dir=tmp_path / "run").history[-1]["accuracy"] < 0.3
