"""The K-step refinement loop: states under no_grad with a refiner snapshot, and the transitions it yields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from iai_dist.refiner import IterativeModel
from iai_dist.tasks import Episode


@dataclass
class Transitions:
    """Greedy-training units: row r is (state theta^(i), mini-batch B^(i), gradient g^(i), query set, step i).

    Rows from many tasks and steps are stacked step-major (row = i * tasks + t), so the learner runs every
    step of a batch in one forward pass. The query set is kept once per task, not once per row: this is
    what episode workers ship to the learner. `version` is the refiner version (learner step) whose weights
    produced the states; the tasks are episodes first_episode .. first_episode + T - 1 of the training stream.
    """

    state: torch.Tensor  # [K*T, ...]
    grad: torch.Tensor | None  # [K*T, P] or None (obs signal)
    x: torch.Tensor  # [K*T, B, d]
    y: torch.Tensor  # [K*T, B, ...]
    x_query: torch.Tensor  # [T, Q, d]
    y_query: torch.Tensor  # [T, Q, ...]
    step: torch.Tensor  # [K*T]
    version: int = 0
    first_episode: int = 0

    def rows_query(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The query set of each row's task, [K*T, Q, ...]."""
        k = self.state.shape[0] // self.x_query.shape[0]
        rep = lambda v: v.repeat(k, *([1] * (v.ndim - 1)))  # noqa: E731
        return rep(self.x_query), rep(self.y_query)

    def to(self, device: torch.device | str) -> "Transitions":
        """A copy on `device` whose tensors own exactly their data (a pickled view would carry its whole base).
        From host memory onto a GPU through pinned pages: the copy then queues behind the GPU's work instead
        of making the host wait for it (a sync per learner step)."""
        to_gpu = torch.device(device).type == "cuda"

        def move(v: torch.Tensor | None) -> torch.Tensor | None:
            if v is None:
                return None
            if to_gpu and v.device.type == "cpu":
                return v.pin_memory().to(device, non_blocking=True)
            return v.to(device, copy=True)

        return Transitions(*(move(getattr(self, f)) for f in _TENSORS), version=self.version,
                           first_episode=self.first_episode)

    @property
    def num_rows(self) -> int:
        return self.state.shape[0]

    @property
    def num_tasks(self) -> int:
        return self.x_query.shape[0]

    @property
    def num_steps(self) -> int:
        return self.num_rows // self.num_tasks


_TENSORS = ("state", "grad", "x", "y", "x_query", "y_query", "step")


@torch.no_grad()
def rolled_out(model: IterativeModel, ep: Episode) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The state (and gradient signal) each of K = ep.num_batches steps starts from, stacked step-major
    (row = i * tasks + t): the part of a rollout that runs the refiner, which train.compile may compile."""
    t, k = ep.num_tasks, ep.num_batches
    state = model.initial_state(ep.x_query)
    states, grads = [], []
    for i in range(k):
        x, y = ep.minibatch(i)
        grad = model.signal(state, x, y)
        states.append(state)
        grads.append(grad)
        if i + 1 < k:  # the last step's output is never an input
            state = model.step(state, x, y, grad, _steps(i, t, ep.x.device), ep.x_query)
    return torch.cat(states), None if grads[0] is None else torch.cat(grads)


def make_transitions(model: IterativeModel, ep: Episode, version: int = 0, first_episode: int = 0,
                     roll: Callable = rolled_out) -> Transitions:
    """Roll out K = ep.num_batches steps (with `roll`: rolled_out, or it compiled) into transitions."""
    t, k = ep.num_tasks, ep.num_batches
    state, grad = roll(model, ep)
    return Transitions(
        state=state,
        grad=grad,
        x=ep.x.transpose(0, 1).reshape(k * t, *ep.x.shape[2:]),
        y=ep.y.transpose(0, 1).reshape(k * t, *ep.y.shape[2:]),
        x_query=ep.x_query,
        y_query=ep.y_query,
        step=torch.arange(k, device=ep.x.device).repeat_interleave(t),
        version=version,
        first_episode=first_episode,
    )


def refined_states(model: IterativeModel, ep: Episode, num_steps: int):
    """The states after steps 0..num_steps of refining on ep's mini-batches with its query points (a generator)."""
    state = model.initial_state(ep.x_query)
    yield state
    for i in range(num_steps):
        x, y = ep.minibatch(i)
        state = model.step(state, x, y, model.signal(state, x, y), _steps(i, ep.num_tasks, ep.x.device), ep.x_query)
        yield state


@torch.no_grad()
def refine(model: IterativeModel, ep: Episode, num_steps: int | None = None) -> list[torch.Tensor]:
    """Query error terms (numerator, denominator per task, stacked [2, T]) after steps 0..num_steps."""
    n = ep.num_batches if num_steps is None else num_steps
    return [torch.stack(model.family.error_terms(model.predict(state, ep.x_query), ep.y_query))
            for state in refined_states(model, ep, n)]


def _steps(i: int, t: int, device) -> torch.Tensor:
    return torch.full((t,), i, dtype=torch.long, device=device)
