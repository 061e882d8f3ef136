"""The algorithm extension point: a server half's extras reach its client half in every runtime,
the client half's extras come back, stragglers and the pairing of halves."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import oiafed
from oiafed import Callback
from oiafed.exceptions import ConfigError
from support import RegistrySnapshot, module_folder, tiny_config, without_timing

MODULE = "oiafed_probe_algorithm"
PROBE = '''
"""A probe algorithm: its server half sends a broadcast and a per-client extra, its client
half echoes what it received, the server half checks the echo."""
import torch

from oiafed import register
from oiafed.core.aggregators import FedAvg, extras_problem
from oiafed.core.learner import Learner
from oiafed.core.types import RoundPlan


@register("aggregator.probe")
class Probe(FedAvg):
    client_half = "probe"

    def __init__(self):
        super().__init__()
        self.echoes = []

    def configure_round(self, global_weights):
        ctx = self.round_context()
        return RoundPlan(
            tensors={"shared": torch.full((2,), float(ctx.round_num))},
            values={"round_says": ctx.round_num},
            client_tensors={cid: {"mine": torch.tensor([float(i)])}
                            for i, cid in enumerate(ctx.sampled)},
            client_values={cid: {"name": cid} for cid in ctx.sampled})

    def update_problem(self, update, global_weights):
        return extras_problem(update, {"echo": torch.Size([3])}, ("steps",))

    def aggregate(self, updates, global_weights):
        ctx = self.round_context()
        for u in updates:
            self.echoes.append([ctx.round_num, u.client_id, u.extra_values["name"],
                                u.extra_tensors["echo"].tolist(), u.extra_values["steps"],
                                u.extra_values["epochs"]])
        return super().aggregate(updates, global_weights)


@register("learner.probe")
class ProbeLearner(Learner):
    server_half = "probe"

    def begin_fit(self):
        self.seen = dict(self.extra_values)

    def end_fit(self, update):
        shared = self.extra_tensors["shared"]
        update.extra_tensors["echo"] = torch.cat([shared, self.extra_tensors["mine"]])
        update.extra_values.update(name=self.seen["name"], steps=self.steps,
                                   epochs=self.seen.get("epochs", self.epochs))
'''


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with module_folder(tmp_path_factory.mktemp("probe"), MODULE, PROBE) as folder:
        yield folder


@pytest.fixture
def probe(probe_dir: Path) -> Iterator[Any]:
    with RegistrySnapshot():
        sys.modules.pop(MODULE, None)
        yield __import__(MODULE)
    sys.modules.pop(MODULE, None)


class Echoes(Callback):
    """Keeps the server half's record of the echoes (it lives in the driver)."""

    def __init__(self) -> None:
        self.rows: list[Any] = []

    async def on_train_end(self, trainer, result, **kwargs):
        self.rows = trainer.aggregator.echoes


def probe_config(**sections: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "imports": [MODULE], "aggregator": {"type": "probe"},
        "learner": {"args": {"lr": 0.05, "batch_size": 32, "epochs": 3}},
        "trainer": {"args": {"rounds": 2, "clients_per_round": 3, "straggler_fraction": 0.34}}}
    return tiny_config(**{**defaults, **sections})


def run_probe(tmp_path: Path, runtime: dict[str, Any]) -> tuple[Any, list[Any]]:
    echoes = Echoes()
    result = oiafed.run(probe_config(runtime=runtime), run_dir=tmp_path / runtime["mode"],
                        callbacks=[echoes])
    return result, echoes.rows


def test_extras_go_both_ways_and_stragglers_do_fewer_epochs(tmp_path, probe):
    _, rows = run_probe(tmp_path, {"mode": "serial"})
    assert len(rows) == 6  # 2 rounds x 3 clients
    for round_num, client_id, name, echo, steps, epochs in rows:
        assert name == client_id
        assert echo[:2] == [float(round_num)] * 2
        assert steps == epochs * 12  # ceil(359 / 32) batches per epoch on every client
    by_round: dict[int, list[int]] = {}
    for round_num, _, _, echo, _, epochs in rows:
        by_round.setdefault(round_num, []).append(epochs)
        assert echo[2] in (0.0, 1.0, 2.0)  # its position among the sampled
    for epochs in by_round.values():  # one straggler of 3 per round, epochs drawn from 1..3
        assert sorted(epochs)[1:] == [3, 3] and 1 <= sorted(epochs)[0] <= 3


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["parallel", "grpc"])
def test_extras_travel_the_same_in_other_runtimes(tmp_path, probe, mode):
    serial, serial_rows = run_probe(tmp_path, {"mode": "serial"})
    other, rows = run_probe(tmp_path, {"mode": mode, "workers": 2})
    assert rows == serial_rows
    assert without_timing(other.history) == without_timing(serial.history)


def test_a_malformed_extra_leaves_the_client_out(tmp_path, probe, user_module):
    user_module("broken_probe", '''
        from oiafed import register
        from oiafed_probe_algorithm import ProbeLearner

        @register("learner.broken_probe")
        class BrokenProbe(ProbeLearner):
            def end_fit(self, update):
                super().end_fit(update)
                if self.client_id == "client_1":
                    update.extra_tensors["echo"] = update.extra_tensors["echo"][:2]
    ''')
    config = probe_config(learner={"type": "broken_probe", "args": {"lr": 0.05}})
    config["imports"] = [MODULE, "broken_probe"]
    config["trainer"]["args"].update(clients_per_round=None, straggler_fraction=0.0)
    result = oiafed.run(config, run_dir=tmp_path / "run")
    assert [row["num_clients"] for row in result.history] == [3, 3]
    errors = (tmp_path / "run" / "clients.jsonl").read_text()
    assert "extra 'echo' is not a tensor of shape (3,)" in errors


def test_the_halves_of_an_algorithm_are_paired_in_the_config(probe, user_module):
    cfg = oiafed.validate(probe_config())
    assert cfg.learner.type == "probe"  # the user named no learner: the algorithm's own
    user_module("other_learner", """
        from oiafed import Learner, register

        @register("learner.other")
        class Other(Learner):
            pass
    """)
    with pytest.raises(ConfigError, match=r"learner\.type.*trains its clients with learner 'probe'"):
        oiafed.validate(probe_config(imports=[MODULE, "other_learner"],
                                     learner={"type": "other"}))
    with pytest.raises(ConfigError, match=r"aggregator\.type.*client half of aggregator 'probe'"):
        oiafed.validate(tiny_config(imports=[MODULE], learner={"type": "probe"}))


class StartWeights(Callback):
    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    async def on_train_start(self, trainer, **kwargs):
        self.weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_fedavg_can_drop_stragglers(tmp_path):
    config = tiny_config(trainer={"args": {"rounds": 1, "straggler_fraction": 1.0}},
                         learner={"args": {"epochs": 2}},
                         aggregator={"args": {"drop_stragglers": True}})
    start = StartWeights()
    dropped = oiafed.run(config, run_dir=tmp_path / "dropped", callbacks=[start])
    for key, value in dropped.weights.items():  # every client straggled: nothing changed
        assert torch.equal(value, start.weights[key])
    config["aggregator"]["args"]["drop_stragglers"] = False
    kept = oiafed.run(config, run_dir=tmp_path / "kept")
    assert not all(torch.equal(v, start.weights[k]) for k, v in kept.weights.items())


def test_straggler_fraction_outside_0_1_is_refused():
    with pytest.raises(ConfigError, match="straggler_fraction"):
        oiafed.validate(tiny_config(trainer={"args": {"straggler_fraction": 1.5}}))
