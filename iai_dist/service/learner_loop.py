"""The per-rank Ray Train loop: the same greedy learner step as in process, fed by this rank's episode workers.

Read top to bottom: restore from the last checkpoint (Ray hands every rank the same one), wrap the greedy
objective in DDP, then per step take the next fresh-enough transition batch from the bounded feed, learn
from it, and on schedule publish weights (rank 0), log (rank 0) and report / checkpoint (all ranks, since
`ray.train.report` is a barrier).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Callable

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from iai_dist.config import validate
from iai_dist.rollout import Transitions
from iai_dist.tracking import RunLogger
from iai_dist.training import Trainer, check_resumable, progress_line, step_metrics


class TransitionFeed:
    """This rank's bounded buffer: `prefetch` rollout requests in flight per episode worker.

    A worker's batches are consumed in the order of its slice (only the head of each worker's queue is
    waited on), whichever worker is ready first; each consumed batch is replaced by a request for the
    next. `cursors[w]` is the next batch number of worker w not yet consumed: what a checkpoint keeps.
    """

    def __init__(self, workers: dict[int, "ray.actor.ActorHandle"], cursors: dict[int, int], prefetch: int):
        self.workers, self.cursors = workers, dict(cursors)
        self._next = dict(cursors)
        self._pending: dict[int, deque] = {w: deque() for w in workers}
        for w in workers:
            for _ in range(prefetch):
                self._request(w)

    def _request(self, w: int) -> None:
        self._pending[w].append(self.workers[w].rollout.remote(self._next[w]))
        self._next[w] += 1

    def next(self) -> tuple[Transitions, float]:
        """The next ready batch and the seconds spent waiting for it (the learner's idle time)."""
        start = time.perf_counter()
        heads = {queue[0]: w for w, queue in self._pending.items()}
        ready, _ = ray.wait(list(heads), num_returns=1)
        w = heads[ready[0]]
        batch, transitions = ray.get(self._pending[w].popleft())
        waited = time.perf_counter() - start
        if batch != self.cursors[w]:
            raise RuntimeError(f"episode worker {w} returned batch {batch}, expected {self.cursors[w]} of its slice")
        self.cursors[w] += 1
        self._request(w)
        return transitions, waited


def learner_loop(config: dict) -> dict:
    """Ray Train's train_loop_per_worker. Returns (rank 0) the service figures of this attempt."""
    # Ray Train logs each report at INFO under a logger named by file path, outside its own log-level filter
    logging.getLogger().setLevel(logging.WARNING)
    cfg = validate(config["config"], "learner config")
    tc, d = cfg.train, cfg.distributed
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    board = config["board"]
    logger: RunLogger = config["logger"] if rank == 0 else RunLogger()
    on_step: Callable[[int, int], None] | None = config["on_step"]
    label, prefix = config["label"], config["prefix"]

    trainer = Trainer(cfg, device)
    cursors = {w: 0 for w in range(d.episode_workers)}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = check_resumable(Path(directory) / "checkpoint.pt", cfg)
        trainer.load_state_dict(state)
        cursors = dict(enumerate(state["episode_cursors"]))
    start_step = trainer.step
    if world > 1:
        trainer.objective = torch.nn.parallel.DistributedDataParallel(
            trainer.objective, device_ids=[device.index] if device.type == "cuda" else None
        )

    def publish() -> None:
        weights = {name: t.detach().to("cpu", copy=True) for name, t in trainer.model.state_dict().items()}
        board.publish.remote(trainer.step, weights)

    if rank == 0:
        publish()
    mine = {w: h for w, h in enumerate(config["episode_workers"]) if w % world == rank}
    feed = TransitionFeed(mine, {w: cursors[w] for w in mine}, d.prefetch)

    # Counters since the last log step: [transitions, dropped transitions, idle seconds, lag sum, lag max];
    # totals (returned) are the steady state: every log window after the first
    window = [0.0] * 5
    totals = {"transitions": 0.0, "dropped": 0.0, "idle_s": 0.0, "seconds": 0.0}
    begin = last = time.perf_counter()
    last_step = trainer.step
    while trainer.step < tc.max_steps:
        while True:  # the next batch fresh enough to learn from
            transitions, waited = feed.next()
            window[2] += waited
            lag = trainer.step - transitions.version
            if 0 <= lag <= d.max_staleness:
                break
            window[1] += transitions.num_rows  # too old, or made by a learner attempt that was rolled back
        window[0] += transitions.num_rows
        window[3] += lag
        window[4] = max(window[4], lag)
        stats = trainer.learn(transitions if device.type == "cpu" else transitions.to(device))
        if rank == 0 and trainer.step % d.sync_every == 0:
            publish()
        if on_step is not None:
            on_step(rank, trainer.step)

        log_now = trainer.step % tc.log_every == 0 or trainer.step == tc.max_steps
        saving = trainer.step % tc.checkpoint_every == 0 or trainer.step == tc.max_steps
        if not (log_now or saving):
            continue
        now = time.perf_counter()
        sums = _all_reduce(window[:4], device) if world > 1 else window[:4]
        lag_max = _all_reduce([window[4]], device, dist.ReduceOp.MAX)[0] if world > 1 else window[4]
        seconds, steps = now - last, trainer.step - last_step
        service = {
            f"{prefix}transitions_per_s": sums[0] / seconds,
            f"{prefix}learner_idle_pct": 100.0 * sums[2] / (world * seconds),
            f"{prefix}staleness_mean": sums[3] / max(steps * world, 1),
            f"{prefix}staleness_max": lag_max,
        }
        if last_step > start_step:  # the first window holds start-up (first weights, compile): not steady state
            totals["transitions"] += sums[0]
            totals["idle_s"] += sums[2] / world
            totals["seconds"] += seconds
        totals["dropped"] += sums[1]
        service[f"{prefix}dropped_transitions"] = totals["dropped"]
        metrics: dict[str, float] = {}
        if rank == 0:
            rate = steps / seconds
            heldout = trainer.heldout_errors()
            metrics = {**step_metrics(prefix, trainer, stats, rate, heldout), **service}
            extra = (f" | idle {service[f'{prefix}learner_idle_pct']:4.1f}% | staleness "
                     f"{service[f'{prefix}staleness_mean']:.1f} (max {lag_max:.0f}) | dropped {totals['dropped']:.0f}")
            # not print(): Ray Train patches it into a logger that also echoes it, so every line came twice
            sys.stdout.write(progress_line(label, trainer, stats, rate, heldout, now - begin, extra) + "\n")
            sys.stdout.flush()
            logger.log_metrics(metrics, trainer.step)
            # what a sweep schedules on (Tune sees the reports): a key that does not depend on K
            metrics.update(learner_step=trainer.step, heldout_error=(heldout or stats.step_errors)[-1])
        window = [0.0] * 5
        if saving:
            _report_checkpoint(trainer, feed, rank, world, metrics)
        else:
            ray.train.report(metrics)  # every rank, the same number of times: it is a barrier
        last, last_step = time.perf_counter(), trainer.step

    nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1:
        nodes = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return {
        "learner_nodes": nodes,
        "start_step": start_step,
        "steps": trainer.step,
        "skipped": trainer.skipped,
        "seconds": totals["seconds"],
        "transitions": totals["transitions"],
        "dropped": totals["dropped"],
        "learner_idle_pct": 100.0 * totals["idle_s"] / max(totals["seconds"], 1e-9),
    }


def _report_checkpoint(trainer: Trainer, feed: TransitionFeed, rank: int, world: int, metrics: dict) -> None:
    """Everything an in-process checkpoint holds, plus every episode worker's slice cursor."""
    cursors = [feed.cursors]
    if world > 1:
        cursors = [None] * world
        dist.all_gather_object(cursors, feed.cursors)
    if rank != 0:
        ray.train.report(metrics)
        return
    merged = {w: c for part in cursors for w, c in part.items()}
    state = trainer.state_dict()
    state["episode_cursors"] = [merged[w] for w in range(len(merged))]
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state, Path(directory) / "checkpoint.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _all_reduce(values: list[float], device: torch.device, op=dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()
