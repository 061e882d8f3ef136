"""The server half's per-client state: versions by round, what a crash leaves, what a resume sees."""

from __future__ import annotations

import pytest
import torch

from oiafed.core.client_states import ClientStates
from oiafed.exceptions import ClientStateError


def files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_state_put_is_read_back_from_disk_by_a_new_object(tmp_path):
    states = ClientStates(tmp_path / "cs")
    states.round = 3
    states.put("client_1", {"c": torch.arange(4.0), "visits": 2})
    assert files(tmp_path / "cs") == ["client_1@3.safetensors"]
    again = ClientStates(tmp_path / "cs", memory_bytes=0)
    state = again.get("client_1")
    assert state is not None and state["visits"] == 2
    assert torch.equal(state["c"], torch.arange(4.0))
    assert again.get("client_2") is None and "client_2" not in again and "client_1" in again


def test_old_versions_go_only_once_a_newer_one_is_durable(tmp_path):
    states = ClientStates(tmp_path)
    for round_num in (1, 2, 3):
        states.round = round_num
        states.put("a", {"v": torch.tensor([float(round_num)])})
    states.collect(durable_round=0)  # nothing saved yet: every version may be needed
    assert files(tmp_path) == ["a@1.safetensors", "a@2.safetensors", "a@3.safetensors"]
    states.collect(durable_round=2)  # a resume after round 2 needs version 2 (and 3 is newer)
    assert files(tmp_path) == ["a@2.safetensors", "a@3.safetensors"]
    states.collect(durable_round=3)
    assert files(tmp_path) == ["a@3.safetensors"]


def test_restore_sees_each_client_as_of_the_saved_round(tmp_path):
    states = ClientStates(tmp_path)
    states.round = 1
    states.put("a", {"v": torch.tensor([1.0])})
    states.put("b", {"v": torch.tensor([1.0])})
    states.round = 2
    states.put("a", {"v": torch.tensor([2.0])})
    states.round = 3  # written after the last save, then the process died
    states.put("a", {"v": torch.tensor([3.0])})
    states.put("c", {"v": torch.tensor([3.0])})
    states.collect(durable_round=1)

    resumed = ClientStates(tmp_path)
    resumed.restore(1)
    assert resumed.get("a")["v"].item() == 1.0
    assert resumed.get("b")["v"].item() == 1.0
    assert resumed.get("c") is None
    assert files(tmp_path) == ["a@1.safetensors", "b@1.safetensors"]
    assert resumed.round == 1


def test_memory_is_bounded_and_reads_fall_back_to_disk(tmp_path):
    states = ClientStates(tmp_path, memory_bytes=3 * 400)
    states.round = 1
    for i in range(10):
        states.put(f"c{i}", {"w": torch.full((100,), float(i))})
    assert states._memory_used <= 3 * 400
    assert [states.get(f"c{i}")["w"][0].item() for i in range(10)] == [float(i) for i in range(10)]


def test_bad_ids_and_values_are_refused_and_nothing_is_written(tmp_path):
    states = ClientStates(tmp_path / "cs")
    with pytest.raises(ClientStateError, match="cannot name a state file"):
        states.put("../evil", {"v": 1})
    with pytest.raises(ClientStateError, match="neither a tensor nor JSON"):
        states.put("ok", {"v": object()})
    assert not (tmp_path / "cs").exists()


def test_a_temporary_folder_is_removed_on_close():
    states = ClientStates()
    states.put("a", {"v": torch.zeros(1)})
    folder = states.folder
    assert folder is not None and folder.is_dir()
    states.close()
    assert not folder.exists()
