"""Simulated attacks against an independent calculation on hand-made updates, the attacked
set, and end to end: which updates are marked, what attacked clients send and train on."""

from __future__ import annotations

import copy
import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

import oiafed
from oiafed import Callback, registry
from oiafed.attacks import ALittleIsEnough, Gaussian, InnerProductManipulation, SignFlip
from oiafed.core.evaluation import evaluate
from oiafed.core.types import ClientUpdate
from oiafed.data.arrays import ArrayDataset
from oiafed.exceptions import ConfigError
from support import tiny_config

SHAPES = {"w": (4, 3), "b": (5,)}


def global_weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    weights["steps"] = torch.tensor(7, dtype=torch.int64)
    return weights


def updates(n: int, seed: int, prefix: str = "c") -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(seed)
    base = global_weights()
    out = []
    for i in range(n):
        weights = {k: base[k] + (i + 1) * 0.1 * torch.randn(s, generator=gen) for k, s in SHAPES.items()}
        weights["steps"] = torch.tensor(100 + i, dtype=torch.int64)
        out.append(ClientUpdate(f"{prefix}{i}", 10, {}, weights))
    return out


def np_delta(update: ClientUpdate, g: dict[str, torch.Tensor], key: str) -> np.ndarray:
    return update.weights[key].double().numpy() - g[key].double().numpy()


def generator(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sign_flip_sends_g_minus_scale_times_the_update() -> None:
    g = global_weights()
    bad, good = updates(2, 1, "bad"), updates(2, 2, "good")
    before_bad, before_good = copy.deepcopy(bad), copy.deepcopy(good)
    SignFlip(clients=["bad0", "bad1"], scale=2.5).apply(bad, good, g, generator())
    for update, original in zip(bad, before_bad, strict=True):
        for key in SHAPES:
            expected = g[key].double().numpy() - 2.5 * np_delta(original, g, key)
            np.testing.assert_allclose(update.weights[key].numpy(), expected, rtol=1e-6, atol=1e-6)
            assert update.weights[key].dtype == torch.float32
        assert torch.equal(update.weights["steps"], original.weights["steps"])  # counters kept
    for update, original in zip(good, before_good, strict=True):
        for key, value in original.weights.items():
            assert torch.equal(update.weights[key], value)


@pytest.mark.parametrize("attack", [SignFlip(clients=["x"]), Gaussian(clients=["x"]),
                                    ALittleIsEnough(clients=["x"]),
                                    InnerProductManipulation(clients=["x"])])
def test_a_round_whose_attacked_clients_all_failed_changes_nothing(attack) -> None:
    good = updates(3, 2, "good")
    before = copy.deepcopy(good)
    attack.apply([], good, global_weights(), generator())  # used to raise for sign_flip
    for update, original in zip(good, before, strict=True):
        for key, value in original.weights.items():
            assert torch.equal(update.weights[key], value)


def test_gaussian_sends_g_plus_n_0_std2_noise_deterministically() -> None:
    g = {"w": torch.randn(200, 150, generator=generator(3)), "b": torch.zeros(10)}
    def fresh() -> list[ClientUpdate]:
        return [ClientUpdate(f"c{i}", 1, {}, {k: v + i + 1 for k, v in g.items()}) for i in range(2)]

    bad = fresh()
    Gaussian(clients=["c0", "c1"], std=0.3).apply(bad, [], g, generator(11))
    noises = [bad[i].weights["w"].double().numpy() - g["w"].double().numpy() for i in range(2)]
    for noise in noises:
        n = noise.size
        assert abs(noise.mean()) < 5 * 0.3 / math.sqrt(n)
        assert noise.std() == pytest.approx(0.3, rel=0.02)
        assert np.mean(np.abs(noise) < 0.3) == pytest.approx(0.6827, abs=0.015)  # Gaussian shape
    assert not np.allclose(noises[0], noises[1])  # each client its own draw
    again = fresh()
    Gaussian(clients=["c0", "c1"], std=0.3).apply(again, [], g, generator(11))
    for first, second in zip(bad, again, strict=True):
        for key in g:
            assert torch.equal(first.weights[key], second.weights[key])
    other = fresh()
    Gaussian(clients=["c0", "c1"], std=0.3).apply(other, [], g, generator(12))
    assert not torch.equal(other[0].weights["w"], bad[0].weights["w"])


def baruch_z_max(n: int, m: int) -> float:
    """Baruch et al. 2019, Eq. (3): s = floor(n/2 + 1) - m; z_max = Phi^-1((n - s) / n)."""
    s = math.floor(n / 2 + 1) - m
    return NormalDist().inv_cdf((n - s) / n)


def test_alie_z_max_is_baruchs_equation_3() -> None:
    assert baruch_z_max(50, 12) == pytest.approx(NormalDist().inv_cdf(0.72))  # s = 14
    assert ALittleIsEnough.z_max(50, 12) == pytest.approx(baruch_z_max(50, 12), abs=1e-12)
    assert ALittleIsEnough.z_max(50, 12) == pytest.approx(0.5828, abs=1e-4)
    assert ALittleIsEnough.z_max(10, 2) == pytest.approx(baruch_z_max(10, 2), abs=1e-12)


@pytest.mark.parametrize("z", [None, 1.5])
def test_alie_sends_mean_minus_z_std_of_the_honest_updates(z) -> None:
    g = global_weights()
    bad, good = updates(12, 4, "bad"), updates(38, 5, "good")
    ALittleIsEnough(clients=[u.client_id for u in bad], z=z).apply(bad, good, g, generator())
    z_used = baruch_z_max(50, 12) if z is None else z
    for key in SHAPES:
        honest = np.stack([np_delta(u, g, key) for u in good])
        target = g[key].double().numpy() + honest.mean(axis=0) - z_used * honest.std(axis=0)
        for update in bad:
            np.testing.assert_allclose(update.weights[key].numpy(), target, rtol=1e-6, atol=1e-6)


def test_ipm_sends_minus_epsilon_times_the_mean_honest_update() -> None:
    g = global_weights()
    bad, good = updates(2, 6, "bad"), updates(5, 7, "good")
    InnerProductManipulation(clients=["bad0", "bad1"], epsilon=0.5).apply(bad, good, g, generator())
    for key in SHAPES:
        mean = np.stack([np_delta(u, g, key) for u in good]).mean(axis=0)
        for update in bad:
            np.testing.assert_allclose(update.weights[key].numpy(),
                                       g[key].double().numpy() - 0.5 * mean, rtol=1e-6, atol=1e-6)


# -- the attacked set ------------------------------------------------------------------------------

IDS = [f"client_{i}" for i in range(10)]


def test_fraction_draws_round_fraction_n_clients_the_same_for_a_seed() -> None:
    chosen = {seed: SignFlip(fraction=0.3).choose(IDS, seed) for seed in range(5)}
    assert all(len(c) == 3 and c <= set(IDS) for c in chosen.values())
    assert SignFlip(fraction=0.3).choose(IDS, 2) == chosen[2]
    assert len(set(chosen.values())) > 1  # the seed matters
    assert SignFlip(fraction=0.0).choose(IDS, 0) == frozenset()
    assert SignFlip(fraction=1.0).choose(IDS, 0) == frozenset(IDS)
    assert len(SignFlip(fraction=0.16).choose(IDS, 0)) == 2  # round(1.6)


def test_clients_names_the_attacked_set() -> None:
    assert SignFlip(clients=["client_3", "client_7"]).choose(IDS, 0) == {"client_3", "client_7"}


def test_an_unknown_client_id_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        SignFlip(clients=["client_3", "client_42"]).choose(IDS, 0)
    assert info.value.path == "attack.args.clients"
    assert "client_42" in str(info.value)


def test_an_unknown_client_id_is_refused_by_run(tmp_path) -> None:
    config = tiny_config(attack={"type": "sign_flip", "args": {"clients": ["client_9"]}})
    with pytest.raises(ConfigError, match=r"attack\.args\.clients.*client_9"):
        oiafed.run(config, run_dir=tmp_path / "run")


@pytest.mark.parametrize(("args", "path"), [
    ({"fraction": 0.3, "clients": ["client_0"]}, "attack.args"),
    ({}, "attack.args"),
    ({"fraction": 1.5}, "attack.args.fraction"),
    ({"fraction": 0.3, "scale": 0.0}, "attack.args.scale"),
])
def test_bad_attack_arguments(args, path) -> None:
    with pytest.raises(ConfigError) as info:
        registry.build("attack", {"type": "sign_flip", "args": args}, "attack")
    assert info.value.path == path


# -- end to end ------------------------------------------------------------------------------------

class Capture(Callback):
    """Per round: the global weights and the updates the aggregator is given."""

    def __init__(self) -> None:
        self.rounds: list[dict] = []
        self.attacked: frozenset[str] = frozenset()
        self.trainer = None

    def on_aggregate_start(self, trainer, updates, **kwargs):
        self.trainer, self.attacked = trainer, trainer.attacked
        self.rounds.append({
            "global": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "updates": {u.client_id: (u.attacked, {k: v.clone() for k, v in u.weights.items()})
                        for u in updates},
        })


def run_captured(tmp_path, name: str, rounds: int = 3, **sections) -> Capture:
    capture = Capture()
    config = tiny_config(data={"type": "digits", "num_clients": 10},
                         trainer={"args": {"rounds": rounds, "clients_per_round": 5}}, **sections)
    oiafed.run(config, run_dir=tmp_path / name, callbacks=[capture])
    return capture


def test_sign_flip_run_marks_exactly_the_attacked_sampled_clients(tmp_path) -> None:
    attacked = run_captured(tmp_path, "attacked",
                            attack={"type": "sign_flip", "args": {"fraction": 0.3}})
    assert len(attacked.attacked) == 3 and attacked.attacked <= set(IDS)
    marked = honest = 0
    for record in attacked.rounds:
        for client_id, (flag, _) in record["updates"].items():
            assert flag == (client_id in attacked.attacked)
            marked, honest = marked + flag, honest + (not flag)
    assert marked and honest  # guard: both kinds were sampled
    # Round 1 starts from the same model as an attack-free run, whose clients train the
    # same: attacked clients sent g - (w - g) instead of w, the others w itself.
    clean = run_captured(tmp_path, "clean", rounds=1)
    g = attacked.rounds[0]["global"]
    for client_id, (flag, weights) in attacked.rounds[0]["updates"].items():
        honest_flag, honest_weights = clean.rounds[0]["updates"][client_id]
        assert not honest_flag
        for key, value in weights.items():
            if flag:
                expected = 2 * g[key].double().numpy() - honest_weights[key].double().numpy()
                np.testing.assert_allclose(value.numpy(), expected, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(value, honest_weights[key])


def flipped_accuracy(capture: Capture, weights) -> tuple[float, float]:
    """(accuracy on the true labels, accuracy on flipped labels) of ``weights`` on the test set."""
    model = copy.deepcopy(capture.trainer.model)
    model.load_state_dict(weights)
    data = capture.trainer.test_data
    flipped = ArrayDataset(data.x, data.num_classes - 1 - data.y, data.num_classes)
    return evaluate(model, data)["accuracy"], evaluate(model, flipped)["accuracy"]


def test_label_flip_clients_train_on_flipped_labels(tmp_path) -> None:
    learner = {"args": {"lr": 0.5, "batch_size": 16, "epochs": 5}}
    attacked = run_captured(tmp_path, "attacked", rounds=1, learner=learner,
                            attack={"type": "label_flip", "args": {"fraction": 0.3}})
    clean = run_captured(tmp_path, "clean", rounds=1, learner=learner)
    first = attacked.rounds[0]["updates"]
    assert any(flag for flag, _ in first.values()) and not all(flag for flag, _ in first.values())
    for client_id, (flag, weights) in first.items():
        assert flag == (client_id in attacked.attacked)
        clean_weights = clean.rounds[0]["updates"][client_id][1]
        if flag:
            # Its model learnt C - 1 - y: right on flipped test labels, wrong on true ones;
            # the same client without the attack learns the opposite.
            true_acc, flipped_acc = flipped_accuracy(attacked, weights)
            assert flipped_acc > 0.6 and true_acc < 0.15
            true_acc, flipped_acc = flipped_accuracy(clean, clean_weights)
            assert true_acc > 0.6 and flipped_acc < 0.15
        else:  # honest clients are untouched, and what attacked ones send is not altered
            for key, value in weights.items():
                assert torch.equal(value, clean_weights[key])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attack", ["sign_flip", "gaussian", "alie", "ipm"])
def test_attacks_run_with_the_server_on_cuda(tmp_path, attack) -> None:
    # The global weights live on the server's device; updates arrive on the CPU.
    config = tiny_config(device="cuda", attack={"type": attack, "args": {"fraction": 0.5}},
                         trainer={"args": {"rounds": 2}})
    assert oiafed.run(config, run_dir=tmp_path / "run").rounds_completed == 2
