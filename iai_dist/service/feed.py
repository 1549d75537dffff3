"""A learner rank's experience source on Ray (episode workers) and its checkpoint sink (ray.train.report).

The batch of learner step n is rolled out with the weights of step n - staleness, exactly (the newest version
published by then), so a rank keeps up to staleness + 1 requests in flight: each batch is rolled out while the
learner learns the ones before it, and what every step learns from is fixed by the config, not by timing. That
makes a Ray run reproducible, lets a restarted learner redo its steps on the same transitions, and lets a resume
continue exactly: the checkpoint keeps the weight versions still to be rolled out with.

A request is sent only once its weights exist (published, or on their way to the board). Ray does not keep the
order of actor tasks it retries: a restarted episode worker may re-run its requests in any order, and a request
queued ahead of its weights would block the worker while the request the learner needs to make them waited
behind it (until distributed.rollout_timeout_s).
"""

from __future__ import annotations

import queue
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import ray
import ray.train
import torch

from iai_dist.experience import EpisodeStream
from iai_dist.learner import ServiceError
from iai_dist.rollout import Transitions
from iai_dist.service.episode_worker import pack_weights

WAIT_SLICE_S = 1.0  # while waiting for a batch, check the weight board this often


class VersionSchedule:
    """Which published weights roll out the batch of each learner step: the newest version <= step - staleness
    among those published (the versions a checkpoint kept, then every sync_every-th step after the start), or
    the oldest one while none is that old (the first steps of a run)."""

    def __init__(self, staleness: int, sync_every: int, start: int, kept: list[int]):
        self.staleness, self.sync_every, self.start, self.kept = staleness, sync_every, start, sorted(kept)

    def publishes(self, step: int) -> bool:
        return step > self.start and step % self.sync_every == 0

    def version_for(self, step: int) -> int:
        target = step - self.staleness
        if target > self.start and target - target % self.sync_every > self.start:
            return target - target % self.sync_every
        older = [v for v in self.kept if v <= target]
        return older[-1] if older else self.kept[0]


class RayFeed:
    """This rank's experience source: requests for its slice of each step, dealt round-robin to its episode
    workers, up to staleness + 1 in flight (the bounded buffer: workers roll out only what was asked for).

    Every rank keeps the weight versions that requests still need (the window; rank 0's goes into the
    checkpoint) and rank 0 publishes them. Waits are bounded and self-repairing: while a rank waits for a
    batch it checks the weight board every second and hands a restarted (empty) board the window again; a
    worker that Ray will not restart any more, or no batch within distributed.rollout_timeout_s, ends the
    run with one line naming the worker and the setting to change."""

    def __init__(self, learner, stream: EpisodeStream, workers: dict[int, "ray.actor.ActorHandle"], board,
                 generation: int, schedule: VersionSchedule, window: dict[int, dict], end: int):
        self.learner, self.stream, self.workers, self.board = learner, stream, workers, board
        self.generation, self.schedule, self.window, self.end = generation, schedule, window, end
        self.settings = learner.cfg.distributed
        self.order = sorted(workers)
        # the newest copy to the host that may still be running: copies run in order on the learner's stream,
        # so once it is complete every weight version in the window is
        self.last_copy: torch.cuda.Event | None = None
        self.publisher = Publisher(board) if learner.rank == 0 else None
        self.pending: deque[tuple[int, int, ray.ObjectRef]] = deque()
        self.next_request = learner.step
        self._request_ready()

    def _request_ready(self) -> None:
        """Send the requests of the next steps whose weight versions the learner has made, up to staleness + 1
        unanswered (at staleness s and sync_every 1, the request of step n goes out once step n - s - 1 is learned)."""
        while (self.next_request < self.end and len(self.pending) <= self.schedule.staleness
               and self.schedule.version_for(self.next_request) <= self.learner.step):
            step = self.next_request
            w = self.order[step % len(self.order)]
            ref = self.workers[w].rollout.remote(self.generation, self.schedule.version_for(step),
                                                 self.stream.first(step), self.stream.share)
            self.pending.append((step, w, ref))
            self.next_request += 1

    def next(self, step: int) -> tuple[Transitions, float]:
        asked, w, ref = self.pending.popleft()
        if asked != step:
            raise RuntimeError(f"rank {self.stream.rank}: the feed holds step {asked} where step {step} was due")
        start = time.perf_counter()
        while not ray.wait([ref], timeout=WAIT_SLICE_S)[0]:
            self._repair_board()
            if time.perf_counter() - start > self.settings.rollout_timeout_s:
                raise ServiceError(f"episode worker {w} sent no transitions for learner step {step} in "
                                   f"{self.settings.rollout_timeout_s:g}s (distributed.rollout_timeout_s)")
        try:
            tr = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            restarts = self.settings.worker_restarts
            raise ServiceError(
                f"episode worker {w} died and Ray restarts it no more (distributed.worker_restarts={restarts}; "
                f"raise it if its crashes are transient); last error: {error_line(exc)}") from None
        except ray.exceptions.RayTaskError as exc:
            raise ServiceError(f"episode worker {w} failed on learner step {step}: {error_line(exc)}") from None
        waited = time.perf_counter() - start
        if tr is None or tr.version != self.schedule.version_for(step):
            raise RuntimeError(f"episode worker {w} answered learner step {step} with weight version "
                               f"{None if tr is None else tr.version}, expected {self.schedule.version_for(step)}")
        self._request_ready()  # with sync_every > 1 the next request's weights may already exist
        return tr, waited

    def _repair_board(self) -> None:
        """A weight board that died comes back empty: hand it the versions requests still need."""
        missing = ray.get(self.board.missing.remote(self.generation, list(self.window)))
        if missing:
            window = self._settled_window()
            ray.get(self.board.ensure.remote(self.generation, {v: pack_weights(window[v]) for v in missing}))

    def learned(self, learner) -> None:
        if self.schedule.publishes(learner.step):
            self._publish(learner)
        self._request_ready()

    def _publish(self, learner) -> None:
        weights, copied = host_copy(learner.model)
        # requests still to come are for steps >= learner.step - 1 on every rank (DDP keeps them in lock-step)
        keep_from = self.schedule.version_for(max(learner.step - 1, self.schedule.start))
        self.window = {v: w for v, w in self.window.items() if v >= keep_from}
        self.window[learner.step] = weights
        self.last_copy = copied
        if self.publisher is not None:
            self.publisher.send(self.generation, learner.step, weights, copied, keep_from)

    def _settled_window(self) -> dict[int, dict]:
        """The window once every copy in it is complete (what may be pickled: a checkpoint, a board refill)."""
        if self.last_copy is not None:
            self.last_copy.synchronize()
            self.last_copy = None
        return self.window

    def state_dict(self) -> dict:
        return {"published": dict(self._settled_window())} if self.learner.rank == 0 else {}


def host_copy(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], "torch.cuda.Event | None"]:
    """The model's weights as host tensors without waiting for the device: on a GPU an asynchronous copy into
    pinned memory, queued behind the step that made them, and the event that marks it complete; on a CPU a
    plain copy (complete, no event)."""
    state = model.state_dict()
    if not any(t.is_cuda for t in state.values()):
        return {name: t.detach().to("cpu", copy=True) for name, t in state.items()}, None
    weights = {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t.detach(), non_blocking=True)
               for name, t in state.items()}
    copied = torch.cuda.Event()
    copied.record()
    return weights, copied


class Publisher:
    """Rank 0's publications to the weight board, packed and sent in order from a thread, each once its copy is
    complete: the learner goes on to its next step while its GPU still finishes the last one (no host sync per
    step). An error in the thread is raised by the next `send`, not lost with it."""

    def __init__(self, board):
        self.board, self.queue, self.error = board, queue.SimpleQueue(), None
        threading.Thread(target=self._run, name="weight-publisher", daemon=True).start()

    def send(self, generation: int, version: int, weights: dict, copied: "torch.cuda.Event | None", keep_from: int) -> None:
        if self.error is not None:
            raise RuntimeError(f"the weight publisher stopped: {self.error!r}") from self.error
        self.queue.put((generation, version, weights, copied, keep_from))

    def _run(self) -> None:
        try:
            while True:
                generation, version, weights, copied, keep_from = self.queue.get()
                if copied is not None:
                    copied.synchronize()
                self.board.publish.remote(generation, version, pack_weights(weights), keep_from)
        except Exception as exc:  # noqa: BLE001 - handed to the learner's thread
            self.error = exc


def error_line(error: BaseException) -> str:
    """An exception Ray hands back (not Ray's wrapper around it), on one line."""
    cause = getattr(error, "cause", None) or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}".strip()


class RayTrainSink:
    """Reports go to Ray Train (every rank, each time: it is a barrier); rank 0's carries the checkpoint."""

    def __init__(self, rank: int):
        self.rank = rank

    def report(self, metrics: dict, state: dict | None) -> None:
        if state is None or self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            torch.save(state, Path(directory) / "checkpoint.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
