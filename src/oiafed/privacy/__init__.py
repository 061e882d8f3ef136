"""Differential privacy, set in the config's top-level ``privacy:`` section: central
(user-level DP-FedAvg on the server, ``privacy.central``) or local (sample-level DP-SGD with
Opacus on the clients, ``privacy.local``). dp-accounting and Opacus (the ``privacy`` extra)
are imported on first use."""

from oiafed.privacy.base import Privacy, PrivateTraining
from oiafed.privacy.central import CentralDP, clip_update
from oiafed.privacy.local import LocalDP

__all__ = ["CentralDP", "LocalDP", "Privacy", "PrivateTraining", "clip_update"]
