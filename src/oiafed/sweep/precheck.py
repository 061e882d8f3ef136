"""The checks of a sweep that need data and a model: each grid point built as ``oiafed run``
builds it before its first round (``Experiment.build``), nothing trained or written."""

from __future__ import annotations

import json

from oiafed.data.federated import FederatedSource, build_federated_data
from oiafed.run import Experiment
from oiafed.sweep.grid import Cell, Plan, load_cell_config, naming


def check_builds(sweep: Plan) -> None:
    """Build every grid point's experiment with the point's first seed: a config that fails
    only once data or model exist (a head the model does not have, a local test share that
    leaves a client no training data) fails here, before any cell runs. The data is built
    once per distinct data section.

    Raises:
        ConfigError: naming the cell and the key, as ``oiafed run`` of that cell would.
        InputError: for data that cannot be read, as ``oiafed run`` would.
    """
    firsts: dict[tuple[tuple[str, str], ...], Cell] = {}
    for cell in sweep.cells:
        firsts.setdefault(cell.point, cell)
    datasets: dict[str, FederatedSource] = {}
    for cell in firsts.values():
        cfg = load_cell_config(sweep, cell)
        section = json.dumps([cfg.data.model_dump(mode="json"), cfg.seed], sort_keys=True)
        with naming(f"sweep cell {cell.folder}", None):
            if section not in datasets:
                datasets[section] = build_federated_data(cfg.data, cfg.seed)
            Experiment.build(cfg, data=datasets[section])
