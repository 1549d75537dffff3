"""The regime contract: what the state is, how it predicts, and how it is shown to the refiner as tokens."""

from __future__ import annotations

import math

import torch
from torch import nn

from iai_dist.config import RegimeConfig
from iai_dist.tasks import TaskFamily


class Regime(nn.Module):
    """Owns the learned initial state (and, for explicit, the learned f_gamma).

    A regime turns its state into `state tokens` of `state_feature_dim` features, reads the refiner's
    output at those tokens (`update_dim` per token) back into an additive update, and predicts at
    query points. `state_tokens_see_each_other` is false where state tokens are independent queries.
    """

    state_tokens_see_each_other = True
    num_state_tokens: int | None = None  # None: a set (no position embeddings)
    state_feature_dim: int
    update_dim: int

    def __init__(self, family: TaskFamily, cfg: RegimeConfig):
        super().__init__()
        self.family, self.cfg = family, cfg
        self.uses_grad = "grad" in cfg.signal
        self.uses_obs = "obs" in cfg.signal

    def initial_state(self, x_query: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, state: torch.Tensor, x_query: torch.Tensor) -> torch.Tensor:
        """[T, Q, out_dim] predictions at the query points."""
        raise NotImplementedError

    def gradient(self, state: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """grad of the inner loss on a mini-batch w.r.t. the state, for all tasks at once."""
        raise NotImplementedError(f"{type(self).__name__} has no gradient signal")

    def state_tokens(self, state: torch.Tensor, grad: torch.Tensor | None, x_query: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_update(self, state: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class VectorStateRegime(Regime):
    """State = one vector per task (theta or z), cut into chunk tokens; the gradient rides on the same tokens.

    Token features per chunk: [state chunk] and, with the gradient signal, [grad chunk, grad chunk / rms(grad)]:
    the raw gradient keeps its scale, the normalised copy keeps its direction readable late in
    refinement, when gradients are orders of magnitude smaller than at the start.
    """

    def _setup_tokens(self, state_dim: int) -> None:
        self.state_dim = state_dim
        self.chunk = min(self.cfg.chunk_size, state_dim)
        self.num_state_tokens = math.ceil(state_dim / self.chunk)
        self.state_feature_dim = self.chunk * (3 if self.uses_grad else 1)
        self.update_dim = self.chunk

    def _chunks(self, v: torch.Tensor) -> torch.Tensor:
        pad = self.num_state_tokens * self.chunk - v.shape[1]
        return nn.functional.pad(v, (0, pad)).view(v.shape[0], self.num_state_tokens, self.chunk)

    def state_tokens(self, state, grad, x_query):
        feats = [self._chunks(state)]
        if self.uses_grad:
            rms = grad.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)
            feats += [self._chunks(grad), self._chunks(grad / rms)]
        return torch.cat(feats, -1)

    def apply_update(self, state, update):
        return state + update.flatten(1)[:, : self.state_dim]
