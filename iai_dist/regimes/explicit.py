"""Explicit regime: a learned network f_gamma(x, z) reads a task latent z; the state is z."""

from __future__ import annotations

import torch
from torch import nn

from iai_dist.regimes.base import VectorStateRegime
from iai_dist.regimes.functional import fn_gradient


class LatentPredictor(nn.Module):
    """f_gamma(x, z) = MLP([x, z]); the first layer is split so z is projected once per task, not per point."""

    def __init__(self, in_dim: int, latent_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.x_in = nn.Linear(in_dim, hidden)
        self.z_in = nn.Linear(latent_dim, hidden, bias=False)
        self.body = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.x_in(x) + self.z_in(z).unsqueeze(1))


class ExplicitRegime(VectorStateRegime):
    def __init__(self, family, cfg, generator: torch.Generator):
        super().__init__(family, cfg)
        self.f_gamma = LatentPredictor(family.x_dim, cfg.latent_dim, cfg.hidden, family.out_dim)
        self.z0 = nn.Parameter(torch.zeros(cfg.latent_dim))
        self._setup_tokens(cfg.latent_dim)

    def initial_state(self, x_query):
        return self.with_memory(self.z0.expand(x_query.shape[0], -1))

    def predict(self, state, x_query):
        return self.f_gamma(self.params(state), x_query)

    def gradient(self, state, x, y):
        return fn_gradient(self.f_gamma, self.family, self.params(state), x, y)
