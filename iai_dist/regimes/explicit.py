"""Explicit regime: a learned network f_gamma(x, z) reads a task latent z; the state is z."""

from __future__ import annotations

import torch
from torch import nn

from iai_dist.regimes.base import VectorStateRegime
from iai_dist.regimes.functional import fn_gradient

PRETRAIN_TASKS = 256  # training episodes f_gamma is auto-decoded on (regime.pretrain_steps)


class LatentPredictor(nn.Module):
    """f_gamma(x, z): a two-hidden-layer MLP on x that z conditions.

    'concat' is the paper's MLP([x, z]): z only shifts the first layer (projected once per task, not per
    point), so an interaction such as w . x must be built from GELUs of sums and needs many hidden units.
    'film' also scales each hidden layer's activations by (1 + A_l z) (FiLM, Perez et al. 2018), which
    makes products of z and x features one layer deep: with 32 hidden units and the best latents, 0.58%
    error on linreg-paper where concat has 2.1% (`python -m iai_dist.bench latent`). Its scales start at
    zero, so at initialisation it computes exactly what 'concat' does.
    """

    def __init__(self, in_dim: int, latent_dim: int, hidden: int, out_dim: int, conditioning: str = "film"):
        super().__init__()
        self.x_in = nn.Linear(in_dim, hidden)
        self.z_in = nn.Linear(latent_dim, hidden, bias=False)
        self.body = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        self.z_scale = None
        if conditioning == "film":
            self.z_scale = nn.Linear(latent_dim, 2 * hidden)
            nn.init.zeros_(self.z_scale.weight)
            nn.init.zeros_(self.z_scale.bias)

    @torch.no_grad()
    def whiten(self, z: torch.Tensor) -> None:
        """Reparametrise so that latents z' = S^-1/2 (z - mean) give the same function as z did (S: the
        covariance of the rows of z): z enters only linearly (z_in, z_scale), so mean and S^1/2 fold into
        their weights and biases. The tasks' latents then have zero mean and identity covariance, the scale at
        which the parametric regime's theta lives; for a linear-Gaussian task family this makes the inner
        loss's curvature in z the identity, so a gradient step in z is as well conditioned as one in theta."""
        mean = z.mean(0)
        evals, evecs = torch.linalg.eigh(torch.cov(z.T).reshape(z.shape[1], z.shape[1]))
        root = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T  # S^1/2
        self.x_in.bias += self.z_in.weight @ mean
        self.z_in.weight.copy_(self.z_in.weight @ root)
        if self.z_scale is not None:
            self.z_scale.bias += self.z_scale.weight @ mean
            self.z_scale.weight.copy_(self.z_scale.weight @ root)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.x_in(x) + self.z_in(z).unsqueeze(1)
        if self.z_scale is None:
            return self.body(h)
        act, mid, act2, out = self.body
        scale_1, scale_2 = (1 + self.z_scale(z)).unsqueeze(1).chunk(2, -1)
        return out(act2(mid(act(h) * scale_1)) * scale_2)


class ExplicitRegime(VectorStateRegime):
    def __init__(self, family, cfg, generator: torch.Generator):
        super().__init__(family, cfg)
        self.f_gamma = LatentPredictor(family.x_dim, cfg.latent_dim, cfg.hidden, family.out_dim, cfg.conditioning)
        self.z0 = nn.Parameter(torch.zeros(cfg.latent_dim))
        self._setup_tokens(cfg.latent_dim, generator)

    def pretrain(self, seed: int, steps: int, tasks: int = PRETRAIN_TASKS) -> float:
        """Auto-decode f_gamma on the first `tasks` episodes of the training stream `seed` (context and query
        points), then re-express it in whitened latents (`whiten`) and start z0 at their mean. Returns the
        final loss."""
        ep = self.family.sample(seed, torch.arange(tasks), device=self.z0.device)
        x, y = ep.context()
        x, y = torch.cat([x, ep.x_query], 1), torch.cat([y, ep.y_query], 1)
        with torch.enable_grad():
            z, loss = auto_decode(self.f_gamma, self.family, x, y, steps)
        self.f_gamma.whiten(z)
        with torch.no_grad():
            self.z0.zero_()
        return loss

    def initial_state(self, x_query):
        return self.with_memory(self.z0.expand(x_query.shape[0], -1))

    def predict(self, state, x_query):
        return self.f_gamma(self.params(state), x_query)

    def gradient(self, state, x, y):
        return fn_gradient(self.f_gamma, self.family, self.params(state), x, y)


def auto_decode(f_gamma: LatentPredictor, family, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 3e-3
                ) -> tuple[torch.Tensor, float]:
    """Fit f_gamma with a free latent per task (auto-decoding, as DeepSDF): Adam on f_gamma and the latents
    jointly over the tasks' points x [T, N, d], y [T, N]. Returns the latents and the final loss.

    It gives f_gamma a latent space in which every task has a good z before any refiner exists, so meta-training
    only has to learn to infer z (`regime.pretrain_steps`); `bench latent` uses it to find the regime's floor.
    """
    z = torch.zeros(x.shape[0], f_gamma.z_in.in_features, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([*f_gamma.parameters(), z], lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss = torch.zeros(())
    for _ in range(steps):
        opt.zero_grad()
        loss = family.loss(f_gamma(z, x), y).mean()
        loss.backward()
        opt.step()
        sched.step()
    return z.detach(), float(loss.detach())
