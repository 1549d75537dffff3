"""The greedy learner step: one function, called in-process or by each Ray Train worker.

Each transition's incoming state is data (detached by construction), so the loss after step i sends no
gradient through steps 0..i-1: the greedy objective of DESIGN.md. Only the learned initial state, which
no earlier step produced, is taken live.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from iai_dist.config import TrainConfig
from iai_dist.refiner import IterativeModel
from iai_dist.rollout import Transitions


@dataclass
class StepStats:
    loss: float
    step_losses: list[float]  # mean query loss after each refinement step (index i = after step i+1)
    step_errors: list[float]  # query error % after each refinement step, pooled over the batch
    grad_norm: float
    skipped: bool  # a non-finite loss or gradient: no update was made


def greedy_losses(model: IterativeModel, tr: Transitions, num_steps: int):
    """Over a batch of transitions: per-step mean query loss [num_steps], per-step error terms
    [2, num_steps], and which steps the batch contains [num_steps]."""
    x_query, y_query = tr.rows_query()
    # Step-0 rows start from the live learned initial state, so theta^(0) / z^(0) / y_hat^(0) get a gradient.
    first = (tr.step == 0).view(-1, *([1] * (tr.state.ndim - 1)))
    state = torch.where(first, model.initial_state(x_query), tr.state)
    new_state = model.step(state, tr.x, tr.y, tr.grad, tr.step, x_query)
    out = model.predict(new_state, x_query)
    per_row = model.family.loss(out, y_query)
    num, den = model.family.error_terms(out.detach(), y_query)
    counts = torch.bincount(tr.step, minlength=num_steps)
    losses = per_row.new_zeros(num_steps).index_add(0, tr.step, per_row) / counts.clamp_min(1)
    terms = per_row.new_zeros(2, num_steps).index_add(1, tr.step, torch.stack([num, den]))
    return losses, terms, counts > 0


class GreedyObjective(torch.nn.Module):
    """The greedy losses as a module's forward, so DistributedDataParallel can wrap it on Ray Train workers
    (DDP synchronises gradients of what runs through forward; the refiner itself has several entry points)."""

    def __init__(self, model: IterativeModel):
        super().__init__()
        self.model = model

    def forward(self, tr: Transitions, num_steps: int):
        return greedy_losses(self.model, tr, num_steps)


def learner_step(
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    tr: Transitions,
    cfg: TrainConfig,
    num_steps: int,
) -> StepStats:
    """One greedy step. `objective` is a GreedyObjective, or one wrapped in DistributedDataParallel."""
    objective.train()
    losses, terms, present = objective(tr, num_steps)
    if cfg.step_weighting == "relative":
        loss = losses[present].clamp_min(1e-12).log().mean()  # d log L = dL / L: every step counts alike
    else:
        loss = losses[present].mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # Decide on the gradient norm, not the local loss: under DDP every rank holds the same averaged
    # gradients, so all ranks skip (or take) a non-finite step together and stay in lock-step.
    grad_norm = float(torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.grad_clip))
    finite = math.isfinite(grad_norm)
    if finite:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    errors = (100.0 * terms[0] / terms[1].clamp_min(1e-30)).tolist()
    return StepStats(float(loss.detach()), losses.detach().tolist(), errors, grad_norm, skipped=not finite)
