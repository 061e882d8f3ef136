"""``seed`` also seeds the process-wide generators (Python's ``random``, NumPy's, torch's): a
callback drawing from them gives the same history in every run of one config and seed."""

from __future__ import annotations

import random

import numpy as np
import torch

import oiafed
from oiafed import Callback
from support import tiny_config, without_timing


class RandomSelection(Callback):
    """Steers sampling with the global generators, as the seed page's example does."""

    def __init__(self) -> None:
        self.draws: list[float] = []

    async def on_train_start(self, trainer, **kwargs):
        self.draws.append(float(torch.rand(1)))

    async def on_round_end(self, trainer, round_num, result, **kwargs):
        weights = {cid: random.random() + float(np.random.rand()) for cid in trainer.client_ids}
        self.draws += sorted(weights.values())
        trainer.client_selection_weights = weights


CONFIG = tiny_config(data={"type": "digits", "num_clients": 8},
                     trainer={"args": {"rounds": 5, "clients_per_round": 3}})


def run_once(tmp_path, name: str, seed: int) -> tuple[list[dict], list[float]]:
    selector = RandomSelection()
    result = oiafed.run({**CONFIG, "seed": seed}, run_dir=tmp_path / name, callbacks=[selector])
    return without_timing(result.history), selector.draws


def test_a_callback_using_the_global_generators_is_reproducible(tmp_path):
    random.seed(1)  # whatever the process drew before must not matter
    np.random.seed(1)
    first = run_once(tmp_path, "a", seed=3)
    random.random(), np.random.rand(), torch.rand(1)
    second = run_once(tmp_path, "b", seed=3)
    assert first == second
    other = run_once(tmp_path, "c", seed=4)
    assert other[1] != first[1] and other[0] != first[0]
