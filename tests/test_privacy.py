"""Differential privacy (``privacy:``): central DP-FedAvg and local DP-SGD, their accounting
against the libraries computed directly and a published value, and the budget callback."""

from __future__ import annotations

import asyncio
import json
import math
import sys

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp
from torch import nn

import oiafed
from oiafed.callbacks.base import CallbackManager
from oiafed.core.learner import Learner
from oiafed.core.trainer import Trainer
from oiafed.core.types import ClientUpdate, SecureSum
from oiafed.data.arrays import ArrayDataset
from oiafed.exceptions import (
    CallbackError,
    ConfigError,
    InputError,
    PrivacyError,
    RegistryError,
    SelectionError,
)
from oiafed.privacy.accounting import central_epsilon, local_epsilon
from oiafed.privacy.central import CentralDP, clip_update
from oiafed.privacy.local import DPSGDTraining, LocalDP
from oiafed.registry import register
from oiafed.run_folder import RunFolder
from support import RegistrySnapshot, assert_same_weights, tiny_config, without_timing


def central(**args):
    return {"type": "central", "args": {"noise_multiplier": 0.8, "clip_norm": 0.5, **args}}


def local(**args):
    return {"type": "local", "args": {"noise_multiplier": 1.1, "max_grad_norm": 1.0, **args}}


def delta_of(*shapes: tuple[int, ...], scale: float, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(shape, generator=gen, dtype=torch.float64) * scale
            for i, shape in enumerate(shapes)}


def norm(weights: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in weights.values()
                         if t.is_floating_point()))


# -- clipping and noise -----------------------------------------------------------------------


def test_clipped_updates_never_exceed_the_bound_and_keep_their_direction():
    for seed, scale in enumerate([1e-3, 0.05, 1.0, 30.0]):
        delta = delta_of((3, 5), (7,), (2, 2, 3), scale=scale, seed=seed)
        delta["steps"] = torch.tensor(4)  # an integer buffer: not part of the norm, kept
        before = {k: v.clone() for k, v in delta.items()}
        clipped, was_clipped = clip_update(delta, 0.7)
        assert norm(clipped) <= 0.7 * (1 + 1e-12)
        assert was_clipped == (norm(delta) > 0.7)
        if was_clipped:
            assert norm(clipped) == pytest.approx(0.7, rel=1e-12)
        ratio = clipped["t0"] / delta["t0"]  # the same factor everywhere: same direction
        assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))
        assert torch.equal(clipped["steps"], delta["steps"])
        for key in before:  # the input is not modified
            assert torch.equal(before[key], delta[key])


def bound(dp: CentralDP, num_clients: int, num_sampled: int, seed: int = 3) -> CentralDP:
    dp.bind(num_clients, num_sampled, seed)
    return dp


def test_the_noised_average_is_the_clipped_sum_over_the_sampled_count():
    global_weights = {"w": torch.zeros(4, 3), "b": torch.ones(3), "n": torch.tensor(7)}
    deltas = [delta_of((4, 3), (3,), scale=s, seed=i) for i, s in enumerate([0.01, 2.0, 5.0])]
    updates = [ClientUpdate(f"c{i}", 10 * (i + 1), {}, {
        "w": global_weights["w"] + d["t0"].float(), "b": global_weights["b"] + d["t1"].float(),
        "n": torch.tensor(99)}) for i, d in enumerate(deltas)]
    # 4 clients sampled, 3 answered: the fixed denominator is still 4; weights ignored
    dp = bound(CentralDP(noise_multiplier=0.0, clip_norm=1.0), 10, 4)
    [average] = dp.prepare(1, updates, global_weights)
    expected_w = torch.zeros(4, 3, dtype=torch.float64)
    expected_b = torch.zeros(3, dtype=torch.float64)
    for d in deltas:
        factor = min(1.0, 1.0 / math.sqrt(float(d["t0"].pow(2).sum() + d["t1"].pow(2).sum())))
        expected_w += d["t0"].float().double() * factor
        expected_b += d["t1"].float().double() * factor
    assert torch.allclose(average.weights["w"].double(), expected_w / 4, atol=1e-6)
    assert torch.allclose(average.weights["b"].double(), 1 + expected_b / 4, atol=1e-6)
    assert torch.equal(average.weights["n"], torch.tensor(7))  # integer buffers: global's


def test_a_secure_sum_of_clipped_updates_is_noised_like_the_updates_themselves():
    global_weights = {"w": torch.zeros(5), "steps": torch.tensor(2)}
    deltas = [delta_of((5,), scale=s, seed=i)["t0"].float() for i, s in enumerate([0.1, 3.0])]
    clear = [ClientUpdate(f"c{i}", 1, {}, {"w": d, "steps": torch.tensor(2)})
             for i, d in enumerate(deltas)]
    clipped = [clip_update({"w": d}, 1.0)[0]["w"] for d in deltas]  # as each client does
    secure = SecureSum("sum", 2, {}, {"w": (clipped[0] + clipped[1]) / 2,
                                      "steps": torch.tensor(2)}, members=("c0", "c1"),
                       update_sum={"w": clipped[0].double() + clipped[1].double()})
    expected = bound(CentralDP(noise_multiplier=1.0, clip_norm=1.0), 8, 3).prepare(
        4, clear, global_weights)[0]
    got = bound(CentralDP(noise_multiplier=1.0, clip_norm=1.0), 8, 3).prepare(
        4, [secure], global_weights)[0]
    assert torch.allclose(got.weights["w"], expected.weights["w"], atol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_noise_std_matches_the_formula(adaptive):
    z, clip, m = 1.3, 0.4, 8
    dp = bound(CentralDP(noise_multiplier=z, clip_norm=clip, adaptive=adaptive,
                         count_noise=2.0), 100, m)
    global_weights = {"w": torch.zeros(400, 500)}  # 200,000 coordinates, no update
    [average] = dp.prepare(1, [], global_weights)
    noise = average.weights["w"].double().flatten()
    # Andrew et al. 2021: the update's multiplier is (z^-2 - (2 sigma_b)^-2)^-1/2
    multiplier = 1 / math.sqrt(z ** -2 - (2 * 2.0) ** -2) if adaptive else z
    expected = multiplier * clip / m
    # std of a sample std of n normals ~ sigma / sqrt(2 n): 0.16 % here; 6 of those
    assert float(noise.std()) == pytest.approx(expected, rel=6 / math.sqrt(2 * noise.numel()))
    assert abs(float(noise.mean())) < 6 * expected / math.sqrt(noise.numel())
    again = bound(CentralDP(noise_multiplier=z, clip_norm=clip, adaptive=adaptive,
                            count_noise=2.0), 100, m).prepare(1, [], global_weights)[0]
    assert torch.equal(again.weights["w"], average.weights["w"])  # the seed fixes it


def test_adaptive_clipping_moves_the_clip_geometrically_toward_the_quantile():
    global_weights = {"w": torch.zeros(10)}
    small = [ClientUpdate(f"c{i}", 1, {}, {"w": torch.full((10,), 0.01)}) for i in range(4)]
    dp = bound(CentralDP(noise_multiplier=0.0, clip_norm=1.0, adaptive=True, clip_lr=0.2,
                         target_quantile=0.5, count_noise=1e-9), 10, 4)
    dp.prepare(1, small, global_weights)  # every update unclipped: b = 1
    assert dp.clip_norm == pytest.approx(math.exp(-0.2 * (1 - 0.5)))
    large = [ClientUpdate(f"c{i}", 1, {}, {"w": torch.full((10,), 5.0)}) for i in range(4)]
    dp.prepare(2, large, global_weights)  # every update clipped: b = 0
    assert dp.clip_norm == pytest.approx(math.exp(-0.2 * 0.5) * math.exp(0.2 * 0.5))


# -- accounting ----------------------------------------------------------------------------------


def direct_central_epsilon(n: int, k: int, z: float, rounds: int, delta: float) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(n, k, dp_accounting.GaussianDpEvent(z / 2)),
        rounds))
    return accountant.get_epsilon(delta)


def test_central_epsilon_is_dp_accountings_for_the_trainers_sampling(tmp_path):
    cfg = tiny_config(privacy=central(target_delta=1e-4),
                      trainer={"args": {"rounds": 3, "clients_per_round": 2}})
    result = oiafed.run(cfg, run_dir=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["epsilon"] == pytest.approx(
            direct_central_epsilon(4, 2, 0.8, row["round"], 1e-4), rel=1e-12)
        # the clients' own (unnoised) training metrics are not released with the round
        assert {"train_loss", "train_accuracy", "num_samples"}.isdisjoint(row)
    assert [row["epsilon"] for row in result.history] == [row["epsilon"] for row in rows]
    assert rows[0]["epsilon"] < rows[1]["epsilon"] < rows[2]["epsilon"]


def test_published_value_abadi_et_al_2016_moments_accountant():
    """Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, Section 3.1: q = 0.01,
    sigma = 4, delta = 1e-5, T = 10,000 steps give epsilon ~ 1.26 with the moments accountant,
    whose conversion is ``min over lambda of (alpha(lambda) + log(1 / delta)) / lambda``."""
    orders = np.arange(2, 65)  # lambda = order - 1, integer moments as in the paper
    rdp = np.asarray(compute_rdp(q=0.01, noise_multiplier=4.0, steps=10_000, orders=list(orders)))
    moments = float(np.min(rdp + math.log(1 / 1e-5) / (orders - 1)))
    assert round(moments, 2) == 1.26
    ours = local_epsilon([(0.01, 10_000)], noise_multiplier=4.0, target_delta=1e-5)
    assert ours <= moments  # Opacus's conversion (Balle et al. 2020) is never looser
    assert ours == pytest.approx(1.0355, abs=5e-4)  # Opacus 1.6's orders and conversion


def analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon at ``delta`` of a Gaussian mechanism whose sensitivity is ``mu``
    noise stds (Balle and Wang, ICML 2018, Theorem 8:
    ``delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)``), by bisection."""
    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    low, high = 0.0, 1e3
    for _ in range(200):
        eps = (low + high) / 2
        if phi(mu / 2 - eps / mu) - math.exp(eps) * phi(-mu / 2 - eps / mu) > delta:
            low = eps
        else:
            high = eps
    return high


def test_central_epsilon_sampling_everyone_is_a_gaussian_of_sensitivity_2c():
    """q = 1: every round is the Gaussian mechanism on the clipped sum, noise z C, which
    swapping one client moves by up to 2 C; T rounds are one Gaussian of ``mu = sqrt(T) 2 / z``
    noise stds. RDP's epsilon lies between the exact one and Mironov's conversion of the
    Gaussian's RDP ``T alpha (2C)^2 / (2 (zC)^2)`` (Mironov 2017, Proposition 3)."""
    z, rounds, delta = 1.5, 20, 1e-5
    ours = central_epsilon(num_clients=5, num_sampled=5, noise_multiplier=z, rounds=rounds,
                           target_delta=delta)
    plain = rdp_privacy_accountant.RdpAccountant()
    plain.compose(dp_accounting.GaussianDpEvent(z / 2), rounds)
    assert ours == pytest.approx(plain.get_epsilon(delta), rel=1e-9)
    exact = analytic_gaussian_epsilon(math.sqrt(rounds) * 2 / z, delta)
    mironov = min(rounds * 2 * alpha / z ** 2 + math.log(1 / delta) / (alpha - 1)
                  for alpha in np.linspace(1.01, 100, 10_000))
    assert exact < ours < mironov
    assert ours == pytest.approx(exact, rel=0.1)


def test_local_epsilon_is_opacus_accountants_for_the_clients_history():
    history = [(0.05, 120), (0.2, 30)]
    accountant = RDPAccountant()
    accountant.history = [(1.1, q, steps) for q, steps in history]
    assert local_epsilon(history, noise_multiplier=1.1, target_delta=1e-5) == pytest.approx(
        accountant.get_epsilon(1e-5), rel=1e-12)


# -- the privacy budget ------------------------------------------------------------------------


def test_privacy_budget_stops_before_epsilon_would_pass_it(tmp_path):
    eps = [direct_central_epsilon(4, 2, 0.8, t, 1e-5) for t in (1, 2, 3)]
    budget = (eps[1] + eps[2]) / 2
    cfg = tiny_config(privacy=central(), trainer={"args": {"rounds": 5, "clients_per_round": 2}},
                      callbacks=[{"type": "privacy_budget", "args": {"budget": budget}}])
    result = oiafed.run(cfg, run_dir=tmp_path / "run")
    assert result.rounds_completed == 2
    assert all(row["epsilon"] <= budget for row in result.history)
    assert result.stopped_by is not None and "privacy_budget" in result.stopped_by
    assert result.stop_reason.startswith("privacy_budget: round 3 would reach epsilon")
    assert f"> budget {budget:g}" in result.stop_reason
    # resumed, it stops again before training
    again = oiafed.run(None, resume=tmp_path / "run")
    assert again.rounds_completed == 2
    tight = oiafed.run(cfg, run_dir=tmp_path / "tight",
                       overrides={"callbacks.0.args.budget": eps[0] / 2})
    assert tight.rounds_completed == 0 and "round 1 would reach" in tight.stop_reason


def test_privacy_budget_needs_central_privacy():
    with pytest.raises(ConfigError, match=r"privacy_budget needs privacy.type: central"):
        oiafed.validate(tiny_config(callbacks=[{"type": "privacy_budget",
                                                "args": {"budget": 1.0}}]))
    with pytest.raises(ConfigError, match=r"privacy_budget: budget must be"):
        oiafed.validate(tiny_config(privacy=central(), callbacks=[
            {"type": "privacy_budget", "args": {"budget": -1}}]))


# -- composition, runtimes, resume ---------------------------------------------------------------


def test_central_dp_composes_with_server_optimizers(tmp_path):
    common = {"privacy": central(), "trainer": {"args": {"rounds": 2, "clients_per_round": 3}}}
    fedavg = oiafed.run(tiny_config(**common), run_dir=tmp_path / "fedavg")
    # FedAvgM with momentum 0 and server_lr 1 is FedAvg: the same noised average
    fedavgm = oiafed.run(tiny_config(**common, aggregator={
        "type": "fedavgm", "args": {"momentum": 0.0, "server_lr": 1.0}}), run_dir=tmp_path / "m")
    assert without_timing(fedavgm.history) == without_timing(fedavg.history)
    adam = oiafed.run(tiny_config(**common, aggregator={"type": "fedadam"}),
                      run_dir=tmp_path / "adam")
    assert adam.history[-1]["epsilon"] == fedavg.history[-1]["epsilon"]
    assert any(not torch.equal(adam.weights[k], fedavg.weights[k]) for k in fedavg.weights)


def test_central_adaptive_clipping_resumes_to_the_uninterrupted_run(tmp_path):
    cfg = tiny_config(privacy=central(adaptive=True, count_noise=1.0),
                      trainer={"args": {"rounds": 4, "clients_per_round": 2}})
    whole = oiafed.run(cfg, run_dir=tmp_path / "whole")
    oiafed.run(cfg, run_dir=tmp_path / "split", overrides={"trainer.args.rounds": 2})
    resumed = oiafed.run(None, resume=tmp_path / "split", overrides={"trainer.args.rounds": 4})
    assert without_timing(resumed.history) == without_timing(whole.history)
    assert len({row["clip_norm"] for row in whole.history}) == 4  # the clip moved every round
    assert_same_weights(resumed.weights, whole.weights)


@pytest.mark.slow
def test_local_dp_reports_each_clients_epsilon_the_same_in_parallel_and_resumed(tmp_path):
    cfg = tiny_config(privacy=local(), data={"type": "digits", "num_clients": 6},
                      trainer={"args": {"rounds": 3, "clients_per_round": 3}},
                      learner={"args": {"lr": 0.5, "batch_size": 32}})
    serial = oiafed.run(cfg, run_dir=tmp_path / "serial")
    rows = [json.loads(line) for line in (tmp_path / "serial" / "clients.jsonl").read_text()
            .splitlines()]
    steps: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        steps.setdefault(row["client_id"], []).append((row["dp_sample_rate"], row["dp_steps"]))
        accountant = RDPAccountant()
        accountant.history = [(1.1, q, int(n)) for q, n in steps[row["client_id"]]]
        assert row["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        assert row["dp_sample_rate"] == pytest.approx(32 / row["num_samples"])
    for history_row in serial.history:
        so_far = [r["epsilon"] for r in rows if r["round"] <= history_row["round"]]
        assert history_row["epsilon_max"] == max(so_far)
    assert serial.history[-1]["accuracy"] > 0.5  # it learns (10 classes)

    parallel = oiafed.run({**cfg, "runtime": {"mode": "parallel", "workers": 2}},
                          run_dir=tmp_path / "parallel")
    assert without_timing(parallel.history) == without_timing(serial.history)
    assert_same_weights(parallel.weights, serial.weights)
    oiafed.run(cfg, run_dir=tmp_path / "split", overrides={"trainer.args.rounds": 2})
    resumed = oiafed.run(None, resume=tmp_path / "split", overrides={"trainer.args.rounds": 3})
    assert without_timing(resumed.history) == without_timing(serial.history)


# -- bad configs --------------------------------------------------------------------------------


def test_bad_privacy_configs_name_the_key():
    with pytest.raises(RegistryError, match=r"privacy.type"):
        oiafed.validate(tiny_config(privacy={"type": "centrall"}))
    with pytest.raises(ConfigError, match=r"privacy.args.noise_multiplier"):
        oiafed.validate(tiny_config(privacy=central(noise_multiplier=-1)))
    with pytest.raises(ConfigError, match=r"privacy.args"):
        oiafed.validate(tiny_config(privacy=central(clip=1.0)))
    with pytest.raises(ConfigError, match=r"privacy.args.max_grad_norm"):
        oiafed.validate(tiny_config(privacy=local(max_grad_norm=0)))
    with pytest.raises(ConfigError, match=r"aggregator.type.*privacy.type central.*'krum'"):
        oiafed.validate(tiny_config(privacy=central(), aggregator={"type": "krum"}))
    with pytest.raises(ConfigError, match=r"aggregator.type.*'scaffold'"):
        oiafed.validate(tiny_config(privacy=central(), aggregator={"type": "scaffold"}))
    with pytest.raises(ConfigError, match=r"learner.type.*'fedprox'.*training_step"):
        oiafed.validate(tiny_config(privacy=local(), aggregator={"type": "fedprox"}))
    with pytest.raises(ConfigError, match=r"data.local_test_fraction"):
        oiafed.validate(tiny_config(privacy=local(), data={
            "type": "digits", "num_clients": 4, "local_test_fraction": 0.2}))
    with pytest.raises(ConfigError, match=r"privacy.args.count_noise"):
        oiafed.run(tiny_config(privacy=central(adaptive=True, count_noise=0.1)))


def test_selection_weights_are_refused_under_central_dp(tmp_path):
    class Steer(oiafed.Callback):
        async def on_round_end(self, trainer, round_num, result, **kwargs):
            trainer.client_selection_weights = {"client_0": 1.0, "client_1": 1.0}

    cfg = tiny_config(privacy=central(), trainer={"args": {"rounds": 2, "clients_per_round": 2}})
    with pytest.raises(SelectionError, match=r"uniform sampling"):
        oiafed.run(cfg, run_dir=tmp_path / "run", callbacks=[Steer()])


def test_a_model_opacus_cannot_handle_is_a_clear_error(tmp_path):
    with RegistrySnapshot():
        @register("model.bn_mlp")
        def bn_mlp(input_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 16),
                                 nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes))

        with pytest.raises(ConfigError, match=r"model.type: .*'bn_mlp'.*BatchNorm"):
            oiafed.run(tiny_config(privacy=local(), model={"type": "bn_mlp"}),
                       run_dir=tmp_path / "run")
        assert not (tmp_path / "run").exists()


def test_without_the_privacy_extra_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"privacy.type: .*pip install oiafed\[privacy\]"):
        oiafed.validate(tiny_config(privacy=central()))
    monkeypatch.setitem(sys.modules, "opacus", None)
    with pytest.raises(ConfigError, match=r"pip install oiafed\[privacy\]"):
        oiafed.validate(tiny_config(privacy=local()))


# -- randomness, what is sent, resume --------------------------------------------------------


def test_secure_rng_draws_noise_and_sampling_the_seed_cannot_redraw(tmp_path):
    global_weights = {"w": torch.zeros(50)}
    draws = [bound(CentralDP(noise_multiplier=1.0, secure_rng=secure), 8, 3).prepare(
        1, [], global_weights)[0].weights["w"] for secure in (True, True, False, False)]
    assert not torch.equal(draws[0], draws[1])  # the same seed and round, fresh noise
    assert torch.equal(draws[2], draws[3])  # the seed's noise, reproducible

    cfg = tiny_config(privacy=central(secure_rng=True), data={"type": "digits", "num_clients": 8},
                      trainer={"args": {"rounds": 3, "clients_per_round": 2}})
    sampled = []
    for name in ("a", "b"):
        oiafed.run(cfg, run_dir=tmp_path / name)
        rows = (tmp_path / name / "clients.jsonl").read_text().splitlines()
        sampled.append([(row["round"], row["client_id"]) for row in map(json.loads, rows)])
    assert sampled[0] != sampled[1]  # 28 pairs a round: equal 3 rounds running with p < 1e-4


def test_grpc_must_say_where_the_noise_comes_from(caplog):
    for privacy in (central(), local()):
        with pytest.raises(ConfigError, match=r"privacy.args.secure_rng.*deployment"):
            oiafed.validate(tiny_config(privacy=privacy, runtime={"mode": "grpc"}))
    with pytest.raises(ConfigError, match=r"privacy.args.secure_rng.*true or false"):
        oiafed.validate(tiny_config(privacy=central(secure_rng="yes")))
    oiafed.validate(tiny_config(privacy=central(secure_rng=True), runtime={"mode": "grpc"}))
    assert "secure_rng" not in caplog.text
    oiafed.validate(tiny_config(privacy=central(secure_rng=False), runtime={"mode": "grpc"}))
    assert "whoever has it can remove the noise" in caplog.text


def fit_once(learner: Learner, seed: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(40, 4, generator=gen), torch.randint(0, 3, (40,), generator=gen),
                        3)
    update = asyncio.run(learner.fit("c0", {k: torch.zeros_like(v) for k, v in
                                            learner.model.state_dict().items()},
                                     data, round_num=1, seed=seed))
    assert update.metrics["dp_steps"] == learner.steps == 5  # round(40 / 8) Poisson steps
    return update.weights


def private_learner(kind: type[Learner] = Learner, secure_rng: bool = False) -> Learner:
    learner = kind(epochs=1, batch_size=8, lr=0.5)
    torch.manual_seed(0)
    learner.setup(nn.Linear(4, 3), CallbackManager())
    learner.private_training = DPSGDTraining(1.0, 1.0, secure_rng=secure_rng)
    return learner


def test_local_secure_rng_trains_differently_from_the_same_seed():
    seeded = [fit_once(private_learner()) for _ in range(2)]
    assert_same_weights(seeded[0], seeded[1])
    secure = [fit_once(private_learner(secure_rng=True)) for _ in range(2)]
    assert not torch.equal(secure[0]["weight"], secure[1]["weight"])


class PlainEpochs(Learner):
    """Trains its epochs itself, outside DP-SGD (declaring, wrongly, that DP covers it)."""

    extras_under_dp = True

    def train_epoch(self, data, generator):
        private, self.private_training = self.private_training, None
        try:
            return super().train_epoch(data, generator)
        finally:
            self.private_training = private


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # Opacus's, left on
def test_local_dp_refuses_learners_that_train_outside_dp_sgd():
    with RegistrySnapshot():
        register("learner.plain_epochs")(type("Own", (Learner,), {
            "train_epoch": PlainEpochs.train_epoch}))
        with pytest.raises(ConfigError, match=r"learner.type.*'plain_epochs'.*train_epoch"):
            oiafed.validate(tiny_config(privacy=local(), learner={"type": "plain_epochs"}))
    # one that opts in but still trains outside DP-SGD sends nothing
    with pytest.raises(PrivacyError, match=r"took 5 step\(s\), DP-SGD 0"):
        fit_once(private_learner(PlainEpochs))


def test_local_dp_leaves_out_updates_it_cannot_account_for():
    dp = LocalDP()
    good = {"dp_steps": 3.0, "dp_sample_rate": 0.25}
    bad = [{}, {"dp_steps": 3.0}, {**good, "dp_sample_rate": 0.0},
           {**good, "dp_sample_rate": 1.5}, {**good, "dp_steps": 2.5},
           {**good, "dp_steps": 0.0}, {**good, "dp_steps": math.inf}]
    for metrics in bad:
        assert dp.update_problem(ClientUpdate("c", 5, metrics, {})) is not None, metrics
    trainer = Trainer(rounds=1)
    trainer.privacy = dp
    reference = {"w": torch.zeros(3)}
    outcomes = [ClientUpdate("ok", 5, dict(good), {"w": torch.ones(3)}),
                ClientUpdate("bad", 5, {"dp_steps": 3.0}, {"w": torch.ones(3)})]
    dp.observe(1, outcomes)
    accepted = asyncio.run(trainer.accept(1, outcomes, reference))
    assert [u.client_id for u in accepted] == ["ok"]
    assert set(dp.history) == {"ok"}  # only what is aggregated is accounted


class CrashBeforeRound(oiafed.Callback):
    def __init__(self, round_num: int) -> None:
        self.round_num = round_num

    async def on_round_start(self, trainer, round_num, **kwargs):
        if round_num == self.round_num:
            raise RuntimeError("crash")


def test_a_resumed_run_accounts_for_the_rounds_it_redoes(tmp_path):
    cfg = tiny_config(privacy=central(), strict=True,
                      trainer={"args": {"rounds": 4, "clients_per_round": 2}},
                      runtime={"checkpoint_every": 2, "checkpoint_interval": 0})
    with pytest.raises(CallbackError):
        oiafed.run(cfg, run_dir=tmp_path / "run", callbacks=[CrashBeforeRound(4)])
    released = [json.loads(line) for line in
                (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in released] == [1, 2, 3]  # the state holds round 2
    resumed = oiafed.run(None, resume=tmp_path / "run")
    # round 3 was released, then redone: rounds 3 and 4 are the 4th and 5th releases
    assert [row["dp_rounds_released"] for row in resumed.history] == [1, 2, 4, 5]
    assert resumed.history[3]["epsilon"] == pytest.approx(
        direct_central_epsilon(4, 2, 0.8, 5, 1e-5), rel=1e-12)
    assert resumed.history[2]["accuracy"] != released[2]["accuracy"]  # fresh noise


def test_a_resumed_local_dp_run_accounts_for_the_updates_it_redoes(tmp_path):
    """Crashed twice before round 4 (the state holds round 2): round 3 is sent three times."""
    cfg = tiny_config(privacy=local(), strict=True,
                      trainer={"args": {"rounds": 4, "clients_per_round": 2}},
                      runtime={"checkpoint_every": 2, "checkpoint_interval": 0})
    clients = tmp_path / "run" / "clients.jsonl"

    def rows() -> list[dict]:
        return [json.loads(line) for line in clients.read_text().splitlines()]

    with pytest.raises(CallbackError):
        oiafed.run(cfg, run_dir=tmp_path / "run", callbacks=[CrashBeforeRound(4)])
    sent = rows()
    assert [row["round"] for row in sent] == [1, 1, 2, 2, 3, 3]
    with pytest.raises(CallbackError):
        oiafed.run(None, resume=tmp_path / "run", callbacks=[CrashBeforeRound(4)])
    sent += rows()[4:]  # round 3 again
    resumed = oiafed.run(None, resume=tmp_path / "run")
    sent += rows()[4:]  # round 3 a third time, round 4
    assert [row["round"] for row in sent] == [1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 4, 4]
    # every update sent counts: each row's epsilon is that of its client's sends so far
    steps: dict[str, list[tuple[float, int]]] = {}
    for row in sent:
        steps.setdefault(row["client_id"], []).append((row["dp_sample_rate"], int(row["dp_steps"])))
        accountant = RDPAccountant()
        accountant.history = [(1.1, q, n) for q, n in steps[row["client_id"]]]
        assert row["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9), row
    assert resumed.history[-1]["epsilon_max"] == max(row["epsilon"] for row in sent)


def test_the_rows_of_rounds_to_redo_are_read_strictly_but_a_cut_last_line_is_skipped(tmp_path):
    rows = [{"round": r, "client_id": f"c{r}", "dp_steps": 1.0} for r in (1, 2, 3)]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    (tmp_path / "clients.jsonl").write_text(text + '{"round": 3, "client_id": "c4", "dp_st')
    folder = RunFolder(tmp_path)
    assert [row["client_id"] for row in folder.client_rows_after(1)] == ["c2", "c3"]
    (tmp_path / "clients.jsonl").write_text(text.replace('"c2"', '"c2'))  # damaged, not last
    with pytest.raises(InputError, match="line 2 is not JSON"):
        list(folder.client_rows_after(1))
    assert list(RunFolder(tmp_path / "none").client_rows_after(0)) == []
