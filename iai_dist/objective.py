"""The greedy objective (DESIGN.md) over a batch of transitions, and its gradient under data parallelism.

- greedy_terms: the query losses after each refinement step of a batch of transitions. Each transition's
  incoming state is data (rolled out under no_grad), so the loss after step i sends no gradient through steps
  0..i-1. Only the learned initial state, which no step produced, is live. With train.unroll = n > 1 the states
  inside each block of n steps are recomputed live, so a loss reaches back through up to n - 1 earlier steps
  (the paper's open question on non-greedy training).
- greedy_backward: the objective's gradient over the global batch, the same on N ranks as in one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from iai_dist.compiling import compiled
from iai_dist.config import TrainConfig
from iai_dist.refiner import IterativeModel
from iai_dist.rollout import Transitions


def greedy_terms(model: IterativeModel, tr: Transitions, unroll: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Over this batch's T tasks: the query-loss sum after each refinement step [K] (differentiable) and the
    query error terms [2, K] (numerator, denominator; detached)."""
    t, k = tr.num_tasks, tr.num_steps
    x_query, y_query = tr.rows_query()
    # Step-0 rows (the first T: rows are step-major) start from the live learned initial state, so theta^(0)
    # / z^(0) / y_hat^(0) get a gradient; their gradient signal is recomputed at that state, since an episode
    # worker computed it at the initial state of the weights it rolled out with.
    state0 = model.initial_state(tr.x_query)
    if unroll == 1:  # every step at once, each from its stored state
        state = torch.cat([state0, tr.state[t:]])
        grad = None if tr.grad is None else torch.cat([model.signal(state0, tr.x[:t], tr.y[:t]), tr.grad[t:]])
        out = model.predict(model.step(state, tr.x, tr.y, grad, tr.step, x_query), x_query)
    else:
        out = torch.cat(list(unrolled_outputs(model, tr, state0, unroll)))
    per_row = model.family.loss(out, y_query)
    num, den = model.family.error_terms(out.detach(), y_query)
    return per_row.view(k, t).sum(1), torch.stack([num, den]).view(2, k, t).sum(2)


def unrolled_outputs(model: IterativeModel, tr: Transitions, state0: torch.Tensor, unroll: int):
    """f's query outputs after each step, step by step: a block of `unroll` steps starts from its stored
    state (the live initial state for the first) and runs on from the live output of the step before it,
    with the gradient signal taken at that live state (as data: first order, no second derivatives)."""
    t = tr.num_tasks
    state = None
    for i in range(tr.num_steps):
        rows = slice(i * t, (i + 1) * t)
        x, y = tr.x[rows], tr.y[rows]
        if i == 0:
            state, grad = state0, None if tr.grad is None else model.signal(state0, x, y)
        elif i % unroll == 0:
            state, grad = tr.state[rows], None if tr.grad is None else tr.grad[rows]
        else:
            grad = None if tr.grad is None else model.signal(state, x, y)
        state = model.step(state, x, y, grad, tr.step[rows], tr.x_query)
        yield model.predict(state, tr.x_query)


class GreedyObjective(torch.nn.Module):
    """greedy_terms as a module's forward, so DistributedDataParallel can wrap it (DDP synchronises gradients
    of what runs through forward; the refiner itself has several entry points)."""

    def __init__(self, model: IterativeModel, unroll: int = 1, compile_mode: str = "off"):
        super().__init__()
        self.model, self.unroll = model, unroll
        self.terms = compiled(greedy_terms, compile_mode)

    def forward(self, tr: Transitions) -> tuple[torch.Tensor, torch.Tensor]:
        return self.terms(self.model, tr, self.unroll)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def greedy_backward(objective: torch.nn.Module, tr: Transitions, cfg: TrainConfig, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accumulate the greedy objective's gradient into the parameters; returns its value, the per-step mean
    query losses [n] and query errors % [n] (n = the rollout's steps), all over the global batch.

    The objective is the mean over refinement steps i of L_i ('uniform') or of log L_i ('relative': every step
    counts alike, however small its loss), where L_i is the mean query loss after step i over the *global*
    batch; a step past the task's K (train.horizon > 1) weighs train.horizon_weight in that mean, steps 1..K
    weigh 1. Each rank all-reduces its detached per-step loss sums and counts, then differentiates its share
    sum_i S_i^rank / C_i * w_i / sum_i s_i with w_i = s_i (uniform) or s_i / L_i held constant (relative:
    d log L = dL / L), s_i the step's weight, times the world size, since DDP averages the ranks' gradients. The
    N-rank gradient is then the 1-rank one.
    """
    sums, terms = objective(tr)
    n = sums.shape[0]
    totals = torch.cat([sums.detach(), torch.full_like(sums, tr.num_tasks), terms.flatten()])
    world = world_size()
    if world > 1:
        dist.all_reduce(totals)
    counts = totals[n:2 * n]
    step_losses = totals[:n] / counts
    share = torch.ones_like(step_losses)
    share[k:] = cfg.horizon_weight
    if cfg.step_weighting == "relative":
        weight = share / step_losses.clamp_min(1e-12)
        value = (share * step_losses.clamp_min(1e-12).log()).sum() / share.sum()
    else:
        weight = share
        value = (share * step_losses).sum() / share.sum()
    (world * (sums / counts * weight).sum() / share.sum()).backward()
    return value, step_losses, 100.0 * totals[2 * n:3 * n] / totals[3 * n:].clamp_min(1e-30)
