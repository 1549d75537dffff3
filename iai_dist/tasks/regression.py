"""Regression families: y = teacher(x) + N(0, noise_var)."""

from __future__ import annotations

import torch

from iai_dist.tasks.base import TaskFamily, register
from iai_dist.tasks.rng import EpisodeRNG


@register("linear_regression")
class LinearRegression(TaskFamily):
    """y = w.x + eps, w ~ N(0, prior_var I): the Bayes-optimal predictor is known in closed form."""

    kind = "regression"
    natural_model = "linear"
    prior_var = 1.0

    def _sample(self, rng: EpisodeRNG, x: torch.Tensor, x_query: torch.Tensor):
        d, s = self.cfg.dim, self.cfg.noise_var**0.5
        w = rng.normal("w", (d,)) * self.prior_var**0.5
        y = (x @ w[:, :, None]).squeeze(-1) + s * rng.normal("noise", (x.shape[1],))
        yq = (x_query @ w[:, :, None]).squeeze(-1) + s * rng.normal("noise_query", (x_query.shape[1],))
        return y, yq, {"w": w}

    def posterior_mean(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """E[w | x, y] = (X^T X + noise_var/prior_var I)^-1 X^T y, batched: [T, N, d], [T, N] -> [T, d]."""
        ridge = self.cfg.noise_var / self.prior_var
        a = x.transpose(1, 2) @ x + ridge * torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
        return torch.linalg.solve(a, (x.transpose(1, 2) @ y.unsqueeze(-1))).squeeze(-1)


@register("mlp_regression")
class MLPRegression(TaskFamily):
    """y = v . tanh(W x + b) + eps with a random one-hidden-layer teacher, scaled so that E[y^2] ~ 1."""

    kind = "regression"
    natural_model = "mlp"

    def _sample(self, rng: EpisodeRNG, x: torch.Tensor, x_query: torch.Tensor):
        d, h, s = self.cfg.dim, self.cfg.teacher_hidden, self.cfg.noise_var**0.5
        w1 = rng.normal("w1", (d, h)) / d**0.5
        b1 = rng.normal("b1", (h,)) * 0.5
        w2 = rng.normal("w2", (h,)) * (2.5 / h) ** 0.5  # E[tanh(z)^2] ~ 0.4 for z ~ N(0, 1.25)

        def teacher(xs: torch.Tensor) -> torch.Tensor:
            return (torch.tanh(xs @ w1 + b1[:, None]) @ w2[:, :, None]).squeeze(-1)

        y = teacher(x) + s * rng.normal("noise", (x.shape[1],))
        yq = teacher(x_query) + s * rng.normal("noise_query", (x_query.shape[1],))
        return y, yq, {"w1": w1, "b1": b1, "w2": w2}
