"""Where a learner's transitions come from: the episode stream, and the experience-source contract.

The stream fixes which episodes every learner step learns from; a source turns them into transitions: in
process by rolling them out with the current refiner (LocalRollouts, here), on Ray by asking episode-worker
actors for them (service/feed.py).
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from iai_dist.config import ExperimentConfig
from iai_dist.rollout import Transitions, make_transitions
from iai_dist.tasks import Episode, TaskFamily


def rollout_steps(cfg: ExperimentConfig, step: int | None = None) -> int:
    """The refinement steps training rolls out and learns from per episode at learner step `step`: train.horizon
    x K, or K before the curriculum's horizon_from x max_steps; without a step, the horizon's. A function of the
    step (and max_steps, as the lr schedule), so a resumed or redone step rolls out what it did the first time."""
    tc = cfg.train
    before = step is not None and step < tc.horizon_from * tc.max_steps
    return cfg.task.steps * (1 if before else tc.horizon)


def training_episodes(family: TaskFamily, cfg: ExperimentConfig, first: int, count: int,
                      device: torch.device | str) -> Episode:
    """Episodes first..first+count-1 of the training stream (train.seed), one mini-batch per rollout step of
    their learner step (EpisodeStream: episode i belongs to step i // tasks_per_batch): what the in-process
    learner and an episode worker roll out alike."""
    steps = rollout_steps(cfg, first // cfg.train.tasks_per_batch)
    return family.sample(cfg.train.seed, torch.arange(first, first + count), num_batches=steps, device=device)


class EpisodeStream:
    """The training episodes in learner-step order: the global batch of step n is episodes [n*T, (n+1)*T) of
    the stream `train.seed` (T = train.tasks_per_batch), however many learners and episode workers there are;
    rank r of W learns the r-th of W equal slices of it. Episodes are addressed by step, never drawn from a
    shared cursor, so a resume with other numbers of learners or workers neither repeats nor skips one, and a
    step redone after a learner restart learns from the very same episodes."""

    def __init__(self, tasks_per_batch: int, rank: int = 0, world: int = 1, cursor: int = 0):
        self.tasks_per_batch, self.rank, self.world = tasks_per_batch, rank, world
        self.share = tasks_per_batch // world
        self.start = cursor  # the global cursor (episodes learned from by all ranks) when this attempt began
        self.taken = 0  # episodes this rank has learned from since

    def first(self, step: int) -> int:
        """The first episode index of this rank's slice of step `step`."""
        return step * self.tasks_per_batch + self.rank * self.share

    def take(self, tr: Transitions, step: int) -> None:
        """Count a batch in, which must be exactly this rank's slice of this step (else a source is wrong)."""
        if tr.first_episode != self.first(step) or tr.num_tasks != self.share:
            raise RuntimeError(
                f"learner step {step}, rank {self.rank}: got episodes {tr.first_episode}..+{tr.num_tasks}, expected "
                f"{self.first(step)}..+{self.share}"
            )
        self.taken += tr.num_tasks


class ExperienceSource(Protocol):
    """What the learner loop reads transitions from. Every rank calls each method the same number of times."""

    stream: EpisodeStream

    def next(self, step: int) -> tuple[Transitions, float]:
        """This rank's batch for learner step `step`, and the seconds the learner waited for it."""

    def learned(self, learner) -> None:
        """Called after every learner step (on Ray, rank 0 publishes the new weights on schedule)."""

    def state_dict(self) -> dict:
        """What a checkpoint needs to go on exactly from here (rank 0's is kept)."""


class LocalRollouts:
    """In process: each step's episodes rolled out with the current refiner (staleness 0). The learner's
    "wait" is the rollout itself."""

    def __init__(self, learner, stream: EpisodeStream):
        self.learner, self.stream = learner, stream

    def next(self, step: int) -> tuple[Transitions, float]:
        start = time.perf_counter()
        first = self.stream.first(step)
        episodes = training_episodes(self.learner.family, self.learner.cfg, first, self.stream.share, self.learner.device)
        tr = make_transitions(self.learner.model, episodes, version=step, first_episode=first, roll=self.learner.roll)
        return tr, time.perf_counter() - start

    def learned(self, learner) -> None:
        pass

    def state_dict(self) -> dict:
        return {}
