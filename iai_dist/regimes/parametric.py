"""Parametric regime: f is fixed and known; the state is f's flat parameter vector theta per task."""

from __future__ import annotations

import torch
from torch import nn

from iai_dist.regimes.base import VectorStateRegime
from iai_dist.regimes.functional import build_fn, fn_gradient


class ParametricRegime(VectorStateRegime):
    """theta^(0) is learned; learned optimizers and hypernetworks live here."""

    def __init__(self, family, cfg, generator: torch.Generator):
        super().__init__(family, cfg)
        self.fn = build_fn(cfg.model, family.x_dim, family.out_dim, cfg.hidden, family.cfg.generative.components)
        self.theta0 = nn.Parameter(self.fn.init(generator))
        self._setup_tokens(self.fn.num_params, generator)

    def initial_state(self, x_query):
        return self.with_memory(self.theta0.expand(x_query.shape[0], -1))

    def predict(self, state, x_query):
        return self.fn(self.params(state), x_query)

    def gradient(self, state, x, y):
        return fn_gradient(self.fn, self.family, self.params(state), x, y)
