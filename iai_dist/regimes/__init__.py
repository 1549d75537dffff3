"""Regimes by name: what the state is and who predicts (DESIGN.md)."""

import torch

from iai_dist.config import RegimeConfig
from iai_dist.regimes.base import Regime
from iai_dist.regimes.explicit import ExplicitRegime
from iai_dist.regimes.implicit import ImplicitRegime
from iai_dist.regimes.parametric import ParametricRegime
from iai_dist.tasks import TaskFamily

REGIMES = {"parametric": ParametricRegime, "explicit": ExplicitRegime, "implicit": ImplicitRegime}


def build_regime(family: TaskFamily, cfg: RegimeConfig, seed: int) -> Regime:
    return REGIMES[cfg.kind](family, cfg, torch.Generator().manual_seed(seed))


__all__ = ["REGIMES", "Regime", "build_regime"]
