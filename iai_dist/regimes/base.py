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
    num_memory_tokens = 0  # read-only tokens a memory adds (observation statistics), after the state tokens
    memory_feature_dim = 0

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

    def remember(self, state: torch.Tensor, grad: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The state with this step's mini-batch (and gradient) taken into its memory (without memory: unchanged)."""
        return state

    def memory_tokens(self, state: torch.Tensor) -> torch.Tensor | None:
        """[N, num_memory_tokens, memory_feature_dim], or None for a regime without memory tokens."""
        return None


class VectorStateRegime(Regime):
    """State = one vector per task (theta or z), cut into chunk tokens; the gradient rides on the same tokens.

    Token features per chunk: [state chunk] and, with the gradient signal, [grad chunk, grad chunk / rms(grad)]:
    the raw gradient keeps its scale, the normalised copy keeps its direction readable late in
    refinement, when gradients are orders of magnitude smaller than at the start.

    With memory "moments" the state row is [v | m_1 .. m_k | s | w_1 .. w_k, w_s]: v is theta or z (P entries),
    m_j the running mean of the gradient at decay b_j, s that of its square at the slowest decay, and w the
    running mean of 1 at each decay, so m_j / w_j is the bias-corrected mean (Adam's correction, without a
    step counter: it holds past K). Each chunk token then also carries, per decay, [m_j, m_j / sqrt(s)] (the
    latter Adam's per-coordinate step direction) and sqrt(s).

    With memory "observations" the state row is [v | C_xx | C_xy | n]: with x~ = [x, 1] and e(y) the encoded
    target, C_xx is the mean of x~ x~^T and C_xy that of x~ e(y)^T over all n points seen so far (for linear
    regression these are sufficient: the posterior mean is a function of them). They reach the refiner as
    d + 1 read-only memory tokens, token i = [row i of C_xx, row i of C_xy, log(1 + n)].

    With memory "learned" the state row is [v | slot_1 .. slot_M]: M slots of `chunk` entries after v's chunk
    tokens, read and written by the refiner exactly like v's chunks (their gradient features are zero) but never
    read by f, so what a slot keeps is whatever helps later steps' updates. Their start is learned (random, so the
    slots differ); only train.unroll >= 2 lets a later step's loss reach the update that wrote them.
    """

    def _setup_tokens(self, state_dim: int, generator: torch.Generator) -> None:
        self.state_dim = state_dim
        self.decays = tuple(self.cfg.memory_decays) if self.cfg.memory == "moments" else ()
        self.observes = self.cfg.memory == "observations"
        if self.observes:
            a, o = self.family.x_dim + 1, self.family.out_dim
            self.num_memory_tokens, self.memory_feature_dim = a, a + o + 1
        self.chunk = min(self.cfg.chunk_size, state_dim)
        self.num_param_tokens = math.ceil(state_dim / self.chunk)
        self.slots = self.cfg.memory_slots if self.cfg.memory == "learned" else 0
        self.num_state_tokens = self.num_param_tokens + self.slots
        if self.slots:
            self.slots0 = nn.Parameter(torch.randn(self.slots * self.chunk, generator=generator))
        memory_feats = 2 * len(self.decays) + 1 if self.decays else 0
        self.state_feature_dim = self.chunk * ((3 if self.uses_grad else 1) + memory_feats)
        self.update_dim = self.chunk
        if self.decays:  # b_1..b_k for the means, the slowest for the square
            self.register_buffer("_rates", torch.tensor([*self.decays, max(self.decays)]), persistent=False)

    def params(self, state: torch.Tensor) -> torch.Tensor:
        """theta or z: what f reads, what the gradient is taken with respect to."""
        return state[:, : self.state_dim]

    def with_memory(self, v: torch.Tensor) -> torch.Tensor:
        """An initial state: v with empty memory (zero means, weights and counts)."""
        if self.decays:
            return torch.cat([v, v.new_zeros(v.shape[0], (len(self.decays) + 1) * (self.state_dim + 1))], 1)
        if self.observes:
            a = self.num_memory_tokens
            return torch.cat([v, v.new_zeros(v.shape[0], a * (a + self.family.out_dim) + 1)], 1)
        if self.slots:
            return torch.cat([v, self.slots0.expand(v.shape[0], -1)], 1)
        return v

    def _statistics(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """C_xx [N, a, a], C_xy [N, a, o] and n [N, 1] of an "observations" memory."""
        n, a, o = state.shape[0], self.num_memory_tokens, self.family.out_dim
        xx, xy, count = state[:, self.state_dim :].split([a * a, a * o, 1], 1)
        return xx.view(n, a, a), xy.view(n, a, o), count

    def _memory(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, p, slots = state.shape[0], self.state_dim, len(self.decays) + 1
        return state[:, p : p + slots * p].view(n, slots, p), state[:, p + slots * p :]

    def remember(self, state, grad, x, y):
        if self.observes:
            xx, xy, count = self._statistics(state)
            xa = torch.cat([x, torch.ones_like(x[..., :1])], -1)
            b = x.shape[1]
            frac = (b / (count + b)).unsqueeze(-1)  # running means over every point seen
            xx = xx + frac * (xa.transpose(1, 2) @ xa / b - xx)
            xy = xy + frac * (xa.transpose(1, 2) @ self.family.encode_targets(y).to(xa.dtype) / b - xy)
            return torch.cat([self.params(state), xx.flatten(1), xy.flatten(1), count + b], 1)
        if not self.decays:
            return state
        means, weights = self._memory(state)
        rates = self._rates.to(state.dtype)
        k = len(self.decays)
        seen = torch.cat([grad.unsqueeze(1).expand(-1, k, -1), grad.pow(2).unsqueeze(1)], 1)
        means = rates[:, None] * means + (1 - rates[:, None]) * seen
        weights = rates * weights + (1 - rates)
        return torch.cat([self.params(state), means.flatten(1), weights], 1)

    def _chunks(self, v: torch.Tensor) -> torch.Tensor:
        pad = self.num_param_tokens * self.chunk - v.shape[1]
        return nn.functional.pad(v, (0, pad)).view(v.shape[0], self.num_param_tokens, self.chunk)

    def state_tokens(self, state, grad, x_query):
        tokens = self._param_tokens(state, grad)
        if not self.slots:
            return tokens
        slots = state[:, self.state_dim :].view(state.shape[0], self.slots, self.chunk)
        return torch.cat([tokens, nn.functional.pad(slots, (0, tokens.shape[-1] - self.chunk))], 1)

    def _param_tokens(self, state, grad):
        feats = [self._chunks(self.params(state))]
        if self.uses_grad:
            rms = grad.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)
            feats += [self._chunks(grad), self._chunks(grad / rms)]
        if self.decays:
            means, weights = self._memory(state)
            corrected = means / weights.unsqueeze(-1).clamp_min(1e-12)
            root = corrected[:, -1].clamp_min(0).sqrt()
            for j in range(len(self.decays)):
                feats += [self._chunks(corrected[:, j]), self._chunks(corrected[:, j] / (root + 1e-12))]
            feats.append(self._chunks(root))
        return torch.cat(feats, -1)

    def memory_tokens(self, state):
        if not self.observes:
            return None
        xx, xy, count = self._statistics(state)
        return torch.cat([xx, xy, torch.log1p(count).unsqueeze(1).expand(-1, xx.shape[1], 1)], -1)

    def apply_update(self, state, update):
        v = self.params(state) + update[:, : self.num_param_tokens].flatten(1)[:, : self.state_dim]
        if self.slots:
            return torch.cat([v, state[:, self.state_dim :] + update[:, self.num_param_tokens :].flatten(1)], 1)
        return torch.cat([v, state[:, self.state_dim :]], 1) if state.shape[1] > self.state_dim else v
