"""Implicit regime: no parameters; the state is the prediction y_hat (logits) at every query point."""

from __future__ import annotations

import torch
from torch import nn

from iai_dist.regimes.base import Regime


class ImplicitRegime(Regime):
    """Query tokens [x, y_hat] are refined while reading the mini-batch; each attends only to itself and the
    mini-batch, so a query's prediction never depends on which other queries are in the set."""

    state_tokens_see_each_other = False

    def __init__(self, family, cfg, generator: torch.Generator):
        super().__init__(family, cfg)
        self.y0 = nn.Parameter(torch.zeros(family.out_dim))
        self.state_feature_dim = family.x_dim + family.out_dim
        self.update_dim = family.out_dim

    def initial_state(self, x_query):
        return self.y0.expand(x_query.shape[0], x_query.shape[1], -1)

    def predict(self, state, x_query):
        return state

    def state_tokens(self, state, grad, x_query):
        return torch.cat([x_query, state], -1)

    def apply_update(self, state, update):
        return state + update
