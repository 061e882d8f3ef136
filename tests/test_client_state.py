"""ClientStateStore: bounded memory, LRU spills to safetensors files, read back, shared on disk;
and ``learner.client_state`` through a real run."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import oiafed
from oiafed import Callback
from oiafed.client_state import ClientStateError, ClientStateStore
from oiafed.core.learner import Learner
from oiafed.exceptions import ConfigError
from support import tiny_config


def state_of(i: int) -> dict:
    return {"control": torch.arange(3, dtype=torch.float32) + i, "count": torch.tensor([i]),
            "visits": i, "name": f"c{i}", "nested": {"lr": 0.1 * i, "tags": ["a", i]}}


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value) and got[key].dtype == value.dtype
        else:
            assert got[key] == value


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_least_recently_used_entries_spill_and_come_back(tmp_path: Path) -> None:
    store = ClientStateStore(max_in_memory=2, spill_dir=tmp_path)
    for i in range(3):
        store.put(f"client_{i}", state_of(i))
    assert store.num_in_memory == 2
    assert files(tmp_path) == ["client_0.safetensors"]  # the least recently used
    assert_same(store.get("client_0"), state_of(0))  # read back; client_1 is now the oldest
    assert files(tmp_path) == ["client_0.safetensors", "client_1.safetensors"]
    assert store.num_in_memory == 2
    assert_same(store.get("client_1"), state_of(1))
    assert_same(store.get("client_2"), state_of(2))
    assert store.get("client_9") is None and store.get("client_9", {}) == {}
    assert "client_0" in store and "client_9" not in store and 3 not in store


def test_get_counts_as_a_use(tmp_path: Path) -> None:
    store = ClientStateStore(max_in_memory=2, spill_dir=tmp_path)
    store.put("a", {"v": 1})
    store.put("b", {"v": 2})
    store.get("a")
    store.put("c", {"v": 3})
    assert files(tmp_path) == ["b.safetensors"]


def test_memory_stays_bounded_over_many_clients(tmp_path: Path) -> None:
    store = ClientStateStore(max_in_memory=5, spill_dir=tmp_path)
    for step in range(200):
        cid = f"client_{(step * 37) % 60}"
        state = store.get(cid, {"visits": 0})
        state["visits"] += 1
        store.put(cid, state)
        assert store.num_in_memory <= 5
    visits = Counter(f"client_{(step * 37) % 60}" for step in range(200))
    assert all(store.get(cid)["visits"] == n for cid, n in visits.items())
    assert len(files(tmp_path)) >= 55


def test_spilled_files_are_plain_safetensors_with_json_values(tmp_path: Path) -> None:
    store = ClientStateStore(max_in_memory=0, spill_dir=tmp_path)
    store.put("client_3", state_of(3))
    with safe_open(tmp_path / "client_3.safetensors", framework="pt") as handle:
        assert sorted(handle.keys()) == ["control", "count"]
        assert torch.equal(handle.get_tensor("control"), torch.tensor([3.0, 4.0, 5.0]))
        values = json.loads(handle.metadata()["oiafed.values"])
    assert values == {"visits": 3, "name": "c3", "nested": {"lr": 0.1 * 3, "tags": ["a", 3]}}
    assert files(tmp_path) == ["client_3.safetensors"]  # one file: no temp files left


def test_state_persists_across_store_instances(tmp_path: Path) -> None:
    first = ClientStateStore(max_in_memory=2, spill_dir=tmp_path)
    for i in range(5):
        first.put(f"client_{i}", state_of(i))
    first.close()  # flushes the two still in memory
    second = ClientStateStore(max_in_memory=2, spill_dir=tmp_path)
    for i in range(5):
        assert_same(second.get(f"client_{i}"), state_of(i))


def test_write_through_store_shares_state_between_instances(tmp_path: Path) -> None:
    # max_in_memory=0: what several worker processes on one folder need.
    one = ClientStateStore(max_in_memory=0, spill_dir=tmp_path)
    two = ClientStateStore(max_in_memory=0, spill_dir=tmp_path)
    one.put("client_1", {"visits": 1})
    state = two.get("client_1")
    state["visits"] += 1
    two.put("client_1", state)
    assert one.get("client_1") == {"visits": 2}
    assert one.num_in_memory == two.num_in_memory == 0


def test_temporary_spill_folder_is_removed_on_close() -> None:
    store = ClientStateStore(max_in_memory=1)
    store.put("a", {"x": torch.ones(2)})
    assert store.spill_dir is None  # nothing spilled yet, no folder made
    store.put("b", {"x": torch.zeros(2)})
    folder = store.spill_dir
    assert folder is not None and (folder / "a.safetensors").is_file()
    assert torch.equal(store.get("a")["x"], torch.ones(2))
    store.close()
    assert not folder.exists() and store.num_in_memory == 0


def test_delete_forgets_memory_and_disk(tmp_path: Path) -> None:
    store = ClientStateStore(max_in_memory=1, spill_dir=tmp_path)
    store.put("a", {"v": 1})
    store.put("b", {"v": 2})
    store.delete("a")
    store.delete("b")
    store.delete("never")
    assert "a" not in store and "b" not in store and files(tmp_path) == []


def test_values_round_trip_as_json_gives_them(tmp_path: Path) -> None:
    store = ClientStateStore(max_in_memory=0, spill_dir=tmp_path)
    store.put("c", {"pair": (1, 2), "nan": float("nan"), "none": None, "half": torch.ones(2).half()})
    got = store.get("c")
    assert got["pair"] == [1, 2] and math.isnan(got["nan"]) and got["none"] is None
    assert got["half"].dtype == torch.float16


@pytest.mark.parametrize("bad", ["", "../escape", "a/b", ".hidden", "-x", "x" * 201, 7, "é"])
def test_ids_unfit_for_file_names_are_refused(tmp_path: Path, bad: object) -> None:
    store = ClientStateStore(spill_dir=tmp_path)
    with pytest.raises(ClientStateError, match="cannot name a state file"):
        store.put(bad, {"v": 1})
    assert files(tmp_path) == []


def test_bad_states_are_refused_at_put(tmp_path: Path) -> None:
    store = ClientStateStore(max_in_memory=5, spill_dir=tmp_path)
    with pytest.raises(ClientStateError, match="neither a tensor nor JSON-able"):
        store.put("a", {"model": torch.nn.Linear(2, 2)})
    with pytest.raises(ClientStateError, match="dict with str keys"):
        store.put("a", {1: 2})
    with pytest.raises(ClientStateError, match="dict with str keys"):
        store.put("a", [1, 2])
    assert "a" not in store
    with pytest.raises(ValueError):
        ClientStateStore(max_in_memory=-1)


@pytest.mark.parametrize("content", [b"", b"garbage that is not safetensors",
                                     b"\xff" * 8 + b"{}", b"\x02\x00\x00\x00\x00\x00\x00\x00[]"])
def test_a_corrupt_spill_file_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "client_1.safetensors").write_bytes(content)
    store = ClientStateStore(spill_dir=tmp_path)
    with pytest.raises(ClientStateError, match="cannot read client state"):
        store.get("client_1")


def test_a_failed_spill_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    store = ClientStateStore(max_in_memory=0, spill_dir=tmp_path)
    store.put("a", {"v": 1, "t": torch.ones(1)})

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("oiafed.client_state.atomic_open", broken)
    with pytest.raises(OSError, match="disk full"):
        store.put("a", {"v": 2, "t": torch.zeros(1)})
    monkeypatch.undo()
    assert store.get("a")["v"] == 1 and files(tmp_path) == ["a.safetensors"]


# -- learner.client_state -----------------------------------------------------------------------


class CountVisits(Callback):
    """Keeps, per client, the rounds it trained in and its last local weights' norms."""

    learner: Learner | None = None

    async def on_epoch_end(self, learner, epoch, metrics, **kwargs) -> None:
        self.learner = learner
        if epoch != learner.epochs:
            return
        state = learner.client_state
        state["visits"] = state.get("visits", 0) + 1
        state["rounds"] = [*state.get("rounds", []), learner.round_num]
        state["norm"] = torch.stack([p.detach().norm() for p in learner.model.parameters()])


class RecordSelections(Callback):
    def __init__(self) -> None:
        self.selected: list[list[str]] = []

    async def on_round_end(self, trainer, round_num, result, **kwargs) -> None:
        self.selected.append([u.client_id for u in result.updates])


def test_learner_client_state_survives_between_rounds_through_spills(tmp_path: Path) -> None:
    spill = tmp_path / "state"
    config = tiny_config(
        data={"type": "synthetic", "num_clients": 40, "args": {"num_features": 8,
                                                                "num_classes": 3}},
        trainer={"args": {"rounds": 8, "clients_per_round": 6}},
        learner={"args": {"epochs": 2, "client_state": True, "client_state_memory": 4,
                          "client_state_dir": str(spill)}},
        strict=True,
    )
    recorder, counter = RecordSelections(), CountVisits()
    oiafed.run(config, run_dir=tmp_path / "run", callbacks=[counter, recorder])
    expected: dict[str, list[int]] = {}
    for round_num, ids in enumerate(recorder.selected, start=1):
        for cid in ids:
            expected.setdefault(cid, []).append(round_num)
    assert len(expected) > 4 and any(len(r) >= 2 for r in expected.values())
    store = counter.learner.state_store
    assert store.num_in_memory == 4 and store.spills >= len(expected) - 4
    store.flush()
    reader = ClientStateStore(max_in_memory=0, spill_dir=spill)
    assert {p.stem for p in spill.glob("*.safetensors")} == set(expected)
    for cid, rounds in expected.items():
        state = reader.get(cid)
        assert state["rounds"] == rounds and state["visits"] == len(rounds)
        assert state["norm"].shape == (2,)  # logreg: weight and bias


def test_learner_without_client_state_has_none() -> None:
    learner = Learner()
    assert learner.state_store is None and learner.client_state is None
    with pytest.raises(ConfigError, match="client_state_memory"):
        Learner(client_state=True, client_state_memory=-1)
    store = Learner(client_state=True, client_state_memory=3).state_store
    assert isinstance(store, ClientStateStore) and store.max_in_memory == 3
