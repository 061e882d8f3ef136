"""A hostile or damaged state file (issue 14, item 5): the resume fails with an ``InputError``
naming the problem before anything in the run folder changes (``metrics.jsonl``,
``clients.jsonl``, the state file, ``client_state/``), and the untampered state still resumes
to the uninterrupted result."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_tensors

import oiafed
from oiafed.cli import main
from oiafed.core.types import TrainResult
from oiafed.exceptions import InputError
from oiafed.runtime.codec import tensor_bytes
from oiafed.state import STATE_FILE, encode_state
from support import Interrupt, tiny_config, without_timing

# SCAFFOLD keeps per-client state (client_state/); a state every 2 rounds and a cut in
# round 4 leave rows and client state versions of round 3, which a resume drops.
CONFIG = tiny_config(
    trainer={"args": {"rounds": 4, "clients_per_round": 3}},
    aggregator={"type": "scaffold"},
    runtime={"checkpoint_every": 2, "checkpoint_interval": 0},
)

Tree = dict[str, Any]
Tensors = dict[str, torch.Tensor]
Edit = Callable[[Tree, Tensors], object]


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """The uninterrupted run's result."""
    return oiafed.run(CONFIG, run_dir=tmp_path_factory.mktemp("whole") / "run")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped in round 4 (its state is of round 2)."""
    folder = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.raises(KeyboardInterrupt):
        oiafed.run(CONFIG, run_dir=folder, callbacks=[Interrupt(4)])
    return folder


@pytest.fixture
def cut(stopped: Path, tmp_path: Path) -> Path:
    """A fresh copy of the stopped run."""
    folder = tmp_path / "run"
    shutil.copytree(stopped, folder)
    rows = [json.loads(line)["round"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]
    assert any("@3." in p.name for p in (folder / "client_state").iterdir())
    return folder


def everything(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def metadata(folder: Path) -> dict[str, str]:
    data = (folder / STATE_FILE).read_bytes()
    return json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]


def rewrite(folder: Path, edit: Edit) -> None:
    """Edit the state's JSON tree and tensors, then write the file with a valid checksum, as
    someone who writes the file can."""
    file = folder / STATE_FILE
    tree = json.loads(metadata(folder)["oiafed_state"])
    tensors = dict(load_tensors(file.read_bytes()))
    edit(tree, tensors)
    file.write_bytes(encode_state(json.dumps(tree), tensors))


def trainer_value(key: str, value: Any) -> Edit:
    def edit(tree: Tree, tensors: Tensors) -> None:
        tree["trainer"][key] = value
    return edit


def rng_part(part: str, index: int | None, value: Any) -> Edit:
    def edit(tree: Tree, tensors: Tensors) -> None:
        if index is None:
            tree["rng"][part] = value
        else:
            tree["rng"][part][index] = value
    return edit


def rng_tensor(part: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Edit:
    def edit(tree: Tree, tensors: Tensors) -> None:
        ref = tree["rng"][part] if part == "torch" else tree["rng"][part][1]
        tensors[ref["__tensor__"]] = change(tensors[ref["__tensor__"]]).contiguous()
    return edit


def first_weight(tree: Tree) -> str:
    return next(iter(tree["trainer"]["weights"]))


def missing_reference(tree: Tree, tensors: Tensors) -> None:
    tree["trainer"]["weights"][first_weight(tree)] = {"__tensor__": "nope"}


def wrong_shape(tree: Tree, tensors: Tensors) -> None:
    tensors[tree["trainer"]["weights"][first_weight(tree)]["__tensor__"]] = torch.zeros(3)


def nan_weight(tree: Tree, tensors: Tensors) -> None:
    name = tree["trainer"]["weights"][first_weight(tree)]["__tensor__"]
    tensors[name] = torch.full_like(tensors[name], float("nan"))


def broken_aggregator(tree: Tree, tensors: Tensors) -> None:
    tree["trainer"]["aggregator"]["c"] = "x"


def negative_key(tensor: torch.Tensor) -> torch.Tensor:
    changed = tensor.clone()
    changed[0] = -1
    return changed


def flip_tensor_byte(folder: Path) -> None:
    """Flip the lowest bit of the first byte of the tensors' data."""
    file = folder / STATE_FILE
    data = bytearray(file.read_bytes())
    data[8 + int.from_bytes(data[:8], "little")] ^= 1
    file.write_bytes(bytes(data))


def rewritten(edit: Edit) -> Callable[[Path], None]:
    return lambda folder: rewrite(folder, edit)


# The attacks of the issue: each was a traceback, a silent acceptance, or a folder changed.
ATTACKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "round_num -3": (rewritten(trainer_value("round_num", -3)),
                     r"trainer\.round_num: .*greater than or equal to 0 \(got -3\)"),
    "round_num 'five'": (rewritten(trainer_value("round_num", "five")),
                         r"trainer\.round_num: .*integer \(got 'five'\)"),
    "round_num 10**12": (rewritten(trainer_value("round_num", 10**12)),
                         r"trainer\.round_num: .*less than or equal to"),
    "should_stop 'yes'": (rewritten(trainer_value("should_stop", "yes")),
                          r"trainer\.should_stop: .*boolean \(got 'yes'\)"),
    "missing tensor reference": (rewritten(missing_reference),
                                 r"trainer\.weights\.\S+ refers to tensor 'nope'"),
    "flipped byte in a tensor": (flip_tensor_byte, r"checksum mismatch"),
    "wrong weight shape": (rewritten(wrong_shape), r"weights do not fit the model: .* is \(3,\)"),
    "torch rng truncated": (rewritten(rng_tensor("torch", lambda t: t[:100])),
                            r"rng\.torch: .*shape \[5056\]"),
    "numpy rng position": (rewritten(rng_part("numpy", 2, 10**6)),
                           r"rng\.numpy\.2: .*less than or equal to 624"),
}

# More values out of type or range.
MORE: dict[str, tuple[Edit, str]] = {
    "stopped_by 5": (trainer_value("stopped_by", 5), r"trainer\.stopped_by: .*string"),
    "fit_config a list": (trainer_value("fit_config", [1]), r"trainer\.fit_config: .*dict"),
    "non-finite weights": (nan_weight, r"weights do not fit the model: .*non-finite"),
    "broken aggregator state": (broken_aggregator, r"does not fit this config"),
    "python rng version": (rng_part("python", 0, "x"), r"rng\.python\.0: "),
    "python rng position": (rng_tensor("python", lambda t: torch.cat([t[:-1], t[-1:] + 999])),
                            r"rng\.python: .*position"),
    "numpy rng negative key": (rng_tensor("numpy", negative_key), r"rng\.numpy\.1: .*\[0, "),
    "numpy rng part missing": (rng_part("numpy", None, ["MT19937"]),
                               r"rng\.numpy\.1: Field required"),
    "rng missing": (lambda tree, tensors: tree.pop("rng"), r"rng: Field required"),
}


def assert_refused_and_nothing_changed(folder: Path, problem: str) -> None:
    before = everything(folder)
    with pytest.raises(InputError, match=r"^cannot resume: ") as info:
        oiafed.run(None, resume=folder)
    assert info.match(problem)
    assert everything(folder) == before


def assert_resumes_to_the_uninterrupted_result(folder: Path, whole: TrainResult) -> None:
    resumed = oiafed.run(None, resume=folder)
    assert without_timing(resumed.history) == without_timing(whole.history)
    assert resumed.weights.keys() == whole.weights.keys()
    assert all(torch.equal(resumed.weights[k], whole.weights[k]) for k in whole.weights)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ATTACKS))
def test_an_attack_is_refused_and_the_untampered_state_still_resumes(name, whole, cut):
    tamper, problem = ATTACKS[name]
    original = (cut / STATE_FILE).read_bytes()
    tamper(cut)
    assert_refused_and_nothing_changed(cut, problem)
    (cut / STATE_FILE).write_bytes(original)
    assert_resumes_to_the_uninterrupted_result(cut, whole)


@pytest.mark.parametrize("name", list(MORE))
def test_a_value_out_of_type_or_range_is_refused_and_changes_nothing(name, cut):
    edit, problem = MORE[name]
    rewrite(cut, edit)
    assert_refused_and_nothing_changed(cut, problem)


@pytest.mark.parametrize(("saved", "flipped"), [
    (b'round_num\\": 2', b'round_num\\": 3'),  # one bit: 0x32 -> 0x33
    (b'version\\": 3', b'version\\": 2'),  # not read as a version without checksum
])
def test_a_flipped_bit_in_the_saved_values_is_detected(cut, saved, flipped):
    file = cut / STATE_FILE
    data = file.read_bytes()
    assert data.count(saved) == 1
    file.write_bytes(data.replace(saved, flipped))
    assert_refused_and_nothing_changed(cut, "checksum mismatch")


def test_a_version_3_file_without_its_checksum_is_refused(cut):
    file = cut / STATE_FILE
    file.write_bytes(tensor_bytes(dict(load_tensors(file.read_bytes())),
                                  metadata={"oiafed_state": metadata(cut)["oiafed_state"]}))
    assert_refused_and_nothing_changed(cut, "no checksum")


@pytest.mark.slow
def test_a_version_2_file_without_checksum_resumes_and_is_replaced_by_version_3(whole, cut):
    file = cut / STATE_FILE
    tree = json.loads(metadata(cut)["oiafed_state"])
    tree["version"] = 2
    file.write_bytes(tensor_bytes(dict(load_tensors(file.read_bytes())),
                                  metadata={"oiafed_state": json.dumps(tree)}))
    assert_resumes_to_the_uninterrupted_result(cut, whole)
    saved = metadata(cut)
    assert json.loads(saved["oiafed_state"])["version"] == 3 and len(saved["oiafed_sha256"]) == 64


def test_the_cli_exits_2_and_says_what_is_wrong(cut, capsys):
    rewrite(cut, trainer_value("round_num", -3))
    before = everything(cut)
    assert main(["run", "--resume", str(cut), "-q"]) == 2
    assert "trainer.round_num" in capsys.readouterr().err
    assert everything(cut) == before
