"""Baselines on the very same episodes and mini-batches as the refiner (Garg et al. style).

Each returns query error % pooled over the episodes, per refinement step where that makes sense.
"""

from __future__ import annotations

import torch

from iai_dist.regimes.functional import build_fn
from iai_dist.tasks import Episode, TaskFamily


def _pooled(terms: list[torch.Tensor]) -> list[float]:
    """[num, den] per task at each step -> error % per step."""
    return [100.0 * float(t[0].sum() / t[1].sum()) for t in terms]


def natural_fn(family: TaskFamily, hidden: int):
    """The parametric f the family's baselines fit: linear / softmax-linear, or the MLP."""
    return build_fn(family.natural_model, family.x_dim, family.out_dim, hidden)


def bayes_optimal(family: TaskFamily, ep: Episode, num_steps: int) -> list[torch.Tensor] | None:
    """Posterior mean on the points seen after each step (linear regression only: closed form)."""
    if not hasattr(family, "posterior_mean"):
        return None
    terms = [torch.stack(family.error_terms(torch.zeros_like(ep.x_query[..., :1]), ep.y_query))]
    for i in range(1, num_steps + 1):
        w = family.posterior_mean(*ep.context(i))
        pred = (ep.x_query @ w.unsqueeze(-1))
        terms.append(torch.stack(family.error_terms(pred, ep.y_query)))
    return terms


def gradient_descent(
    family: TaskFamily, fn, ep: Episode, num_steps: int, optimizer: str, lr: float, init_seed: int = 0,
    thetas: list | None = None,
) -> list[torch.Tensor]:
    """Adam or SGD on f, one step per mini-batch, all tasks at once (both are per-coordinate, and the
    summed loss gives each task its own gradient, so the tasks stay independent). `thetas`, if given, receives
    the parameters after each step 0..num_steps (generative families generate samples from them)."""
    theta = fn.init(torch.Generator().manual_seed(init_seed)).to(ep.x.device)
    theta = theta.expand(ep.num_tasks, -1).clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr) if optimizer == "adam" else torch.optim.SGD([theta], lr=lr)
    with torch.no_grad():
        terms = [torch.stack(family.error_terms(fn(theta, ep.x_query), ep.y_query))]
    if thetas is not None:
        thetas.append(theta.detach().clone())
    for i in range(num_steps):
        x, y = ep.minibatch(i % ep.num_batches)
        opt.zero_grad()
        family.loss(fn(theta, x), y).sum().backward()
        opt.step()
        with torch.no_grad():
            terms.append(torch.stack(family.error_terms(fn(theta, ep.x_query), ep.y_query)))
        if thetas is not None:
            thetas.append(theta.detach().clone())
    return terms


def select_lr(family: TaskFamily, fn, ep: Episode, num_steps: int, optimizer: str, grid) -> float:
    """The grid learning rate with the lowest query error after num_steps (on separate episodes)."""
    best_lr, best = None, float("inf")
    for lr in grid:
        err = _pooled(gradient_descent(family, fn, ep, num_steps, optimizer, lr)[-1:])[0]
        if err < best:  # nan never wins
            best_lr, best = lr, err
    return grid[0] if best_lr is None else best_lr


def steps_to_reach(family: TaskFamily, fn, ep: Episode, target: float, optimizer: str, grid, max_steps: int):
    """Fewest steps (over the lr grid) for `optimizer`, cycling through the same K mini-batches, to bring
    the pooled query error to `target` %; None if no lr gets there within max_steps."""
    best = None
    for lr in grid:
        errs = _pooled(gradient_descent(family, fn, ep, max_steps, optimizer, lr))
        hit = next((i for i, e in enumerate(errs) if e <= target), None)
        if hit is not None and (best is None or hit < best[0]):
            best = (hit, lr)
    return best


def full_fit(family: TaskFamily, fn, ep: Episode, l2: float = 1e-4, max_iter: int = 500) -> torch.Tensor:
    """f fitted to all K*B context points: least squares in closed form for a linear regressor, else
    L-BFGS to convergence (with a small L2 term so separable classes keep finite weights)."""
    x, y = ep.context()
    if family.kind == "regression" and family.natural_model == "linear":
        xa = torch.cat([x, torch.ones_like(x[..., :1])], -1)
        eye = torch.eye(xa.shape[-1], device=x.device, dtype=x.dtype)
        theta = torch.linalg.solve(xa.transpose(1, 2) @ xa + 1e-8 * eye, xa.transpose(1, 2) @ y.unsqueeze(-1))
        return torch.stack(family.error_terms(fn(theta.squeeze(-1), ep.x_query), ep.y_query))
    theta = fn.init(torch.Generator().manual_seed(0)).to(x.device).expand(ep.num_tasks, -1).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = family.loss(fn(theta, x), y).sum() + l2 * theta.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return torch.stack(family.error_terms(fn(theta, ep.x_query), ep.y_query))
