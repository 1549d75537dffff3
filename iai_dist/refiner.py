"""The refiner h_phi: one Transformer for every regime, and the model that pairs it with a regime.

A refinement step reads state tokens (from the regime: theta/z chunks with their gradient, or query
tokens [x, y_hat]) and observation tokens (the mini-batch's [x, y]), adds a step embedding, and reads an
additive update off the state tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from iai_dist.config import ExperimentConfig, RefinerConfig
from iai_dist.devices import uses_bf16
from iai_dist.regimes import Regime, build_regime
from iai_dist.tasks import TaskFamily


class Block(nn.Module):
    """Pre-norm Transformer block.

    Attention is written out (scores, softmax, weighted sum): refinement sequences are short (tens of
    tokens), where this is several times faster on CPU than the fused flash kernel, and it runs the same
    everywhere. With `independent` state tokens (the implicit regime's query points) the first that many tokens
    each see only themselves and the tokens after them, which see only each other: scored as such, S x (1 + B)
    and B x B, not as a masked (S + B)^2 square, so a step costs O(S * B) in attention, not O((S + B)^2).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, h: torch.Tensor, independent: int = 0) -> torch.Tensor:
        n, length, width = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(n, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scale = q.shape[-1] ** -0.5
        if independent:
            a = _independent_attention(q, k, v, independent, scale)
        else:
            a = ((q @ k.transpose(-2, -1)) * scale).softmax(-1) @ v
        h = h + self.proj(a.transpose(1, 2).reshape(n, length, width))
        return h + self.mlp(self.norm2(h))


def _independent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: int, scale: float) -> torch.Tensor:
    """Attention [N, H, L, dh] where tokens 0..s-1 see themselves and tokens s.., and tokens s.. see each other."""
    k_rest, v_rest = k[:, :, s:], v[:, :, s:]
    to_rest = (q @ k_rest.transpose(-2, -1)) * scale  # [N, H, L, B]: every token's scores on the shared tokens
    to_self = (q[:, :, :s] * k[:, :, :s]).sum(-1, keepdim=True) * scale  # [N, H, S, 1]
    w = torch.cat([to_self, to_rest[:, :, :s]], -1).softmax(-1)
    independent = w[..., :1] * v[:, :, :s] + w[..., 1:] @ v_rest
    return torch.cat([independent, to_rest[:, :, s:].softmax(-1) @ v_rest], 2)


class Refiner(nn.Module):
    """h_phi. `max_steps` step embeddings; steps past the last one reuse it (evaluation beyond K)."""

    def __init__(self, cfg: RefinerConfig, regime: Regime, obs_feature_dim: int, max_steps: int):
        super().__init__()
        w = cfg.width
        self.state_in = nn.Linear(regime.state_feature_dim, w)
        self.obs_in = nn.Linear(obs_feature_dim, w) if regime.uses_obs else None
        self.state_pos = nn.Parameter(torch.zeros(regime.num_state_tokens, w)) if regime.num_state_tokens else None
        self.memory_in = nn.Linear(regime.memory_feature_dim, w) if regime.num_memory_tokens else None
        # memory tokens are rows of a statistic: their position says which row (small random start, so the
        # rows differ from the first step on)
        self.memory_pos = nn.Parameter(0.02 * torch.randn(regime.num_memory_tokens, w)) if regime.num_memory_tokens else None
        self.step_emb = nn.Embedding(max_steps, w)
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(w)
        self.out = nn.Linear(w, regime.update_dim)
        nn.init.zeros_(self.out.weight)  # starts as the identity map on the state
        nn.init.zeros_(self.out.bias)
        self.see_each_other = regime.state_tokens_see_each_other

    def forward(self, state_tokens: torch.Tensor, obs_tokens: torch.Tensor | None, step: torch.Tensor,
                memory_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """state_tokens [N, S, fs], obs_tokens [N, B, fo] or None, step [N], memory_tokens [N, M, fm] or None
        -> updates [N, S, update_dim] (read off the state tokens only)."""
        h = self.state_in(state_tokens)
        if self.state_pos is not None:
            h = h + self.state_pos
        num_state = h.shape[1]
        if memory_tokens is not None:
            h = torch.cat([h, self.memory_in(memory_tokens) + self.memory_pos], 1)
        if obs_tokens is not None:
            h = torch.cat([h, self.obs_in(obs_tokens)], 1)
        h = h + self.step_emb(step.clamp(max=self.step_emb.num_embeddings - 1)).unsqueeze(1)
        independent = 0 if self.see_each_other else num_state  # then: each sees itself and the observations
        for block in self.blocks:
            h = block(h, independent)
        return self.out(self.norm(h[:, :num_state]))


class IterativeModel(nn.Module):
    """A regime plus its refiner: state^(i+1) = state^(i) + h_phi(state^(i), B^(i), signal^(i), i)."""

    def __init__(self, cfg: ExperimentConfig, family: TaskFamily):
        super().__init__()
        self.family = family
        self.regime = build_regime(family, cfg.regime, cfg.train.seed)
        self.obs_predictions = cfg.regime.obs_predictions and cfg.regime.kind != "implicit"
        obs_dim = family.x_dim + family.out_dim * (2 if self.obs_predictions else 1)
        self.refiner = Refiner(cfg.refiner, self.regime, obs_dim, max_steps=cfg.task.steps)
        self.autocast = cfg.train.autocast  # auto | off | bf16
        self.bf16 = uses_bf16(self.autocast, torch.device("cpu"))

    def _apply(self, fn, recurse=True):
        """Every move (.to, .cuda, .cpu) comes through here: train.autocast is resolved for the new device once,
        so a compiled step reads a bool and does not probe the device (which would break its graph)."""
        super()._apply(fn, recurse)
        self.bf16 = uses_bf16(self.autocast, next(self.parameters()).device)
        return self

    def initial_state(self, x_query: torch.Tensor) -> torch.Tensor:
        return self.regime.initial_state(x_query)

    def predict(self, state: torch.Tensor, x_query: torch.Tensor) -> torch.Tensor:
        return self.regime.predict(state, x_query)

    def signal(self, state: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """The gradient signal for a mini-batch, or None when the refiner does not read it."""
        return self.regime.gradient(state, x, y) if self.regime.uses_grad else None

    def step(
        self,
        state: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        grad: torch.Tensor | None,
        step: torch.Tensor,
        x_query: torch.Tensor,
    ) -> torch.Tensor:
        """One refinement step for N = tasks (or tasks x steps) rows at once."""
        state = self.regime.remember(state, grad, x, y)
        obs = None
        if self.regime.uses_obs:
            parts = [x, self.family.encode_targets(y)]
            if self.obs_predictions:
                parts.append(self.family.encode_predictions(self.regime.predict(state, x)))
            obs = torch.cat(parts, -1)
        tokens, memory = self.regime.state_tokens(state, grad, x_query), self.regime.memory_tokens(state)
        with torch.autocast(state.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            update = self.refiner(tokens, obs, step, memory)
        return self.regime.apply_update(state, update.float())
