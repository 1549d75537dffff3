"""Ray Train's train_loop_per_worker: the core's learner loop, fed by this rank's episode workers.

Restore from the newest checkpoint (Ray Train's own after a restart, or the one the driver found), open a new
weight-board generation (rank 0, republishing the versions the checkpoint kept), then run learner.train_loop
with the RayFeed as experience source and ray.train.report as checkpoint sink.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch.distributed as dist

from iai_dist.checkpoint import check_resumable
from iai_dist.config import validate
from iai_dist.experience import EpisodeStream
from iai_dist.learner import Learner, resume, train_loop
from iai_dist.service.episode_worker import pack_weights
from iai_dist.service.feed import RayFeed, RayTrainSink, VersionSchedule
from iai_dist.tracking import RunLogger


def learner_loop(config: dict) -> dict:
    """Returns (every rank) the figures of this attempt; rank 0's become FitResult.service."""
    # Ray Train logs each report at INFO under a logger named by file path, outside its own log-level filter
    logging.getLogger().setLevel(logging.WARNING)
    cfg = validate(config["config"], "learner config")
    d = cfg.distributed
    learner = Learner(cfg, ray.train.torch.get_device())
    rank, world = learner.rank, learner.world

    ckpt = _starting_checkpoint(cfg, config["driver_checkpoint"])
    cursor, window = 0, {}
    if ckpt is not None:
        cursor = resume(learner, ckpt)
        window = dict(ckpt.get("experience", {}).get("published", {}))
    else:
        learner.pretrain()
    if not window:  # a fresh start, or a checkpoint of the in-process path: publish the weights at hand
        window = {learner.step: {k: t.detach().to("cpu", copy=True) for k, t in learner.model.state_dict().items()}}
    schedule = VersionSchedule(d.staleness, d.sync_every, learner.step, list(window))
    board = config["board"]
    # this learner attempt's: later attempts, larger (past the board's, should rank 0's node clock be behind)
    generation = [max(time.time_ns(), (ray.get(board.info.remote())["generation"] or 0) + 1) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(generation, src=0)
    if rank == 0:
        ray.get(board.ensure.remote(generation[0], {v: pack_weights(w) for v, w in window.items()}))
    mine = {w: h for w, h in enumerate(config["episode_workers"]) if w % world == rank}
    stream = EpisodeStream(cfg.train.tasks_per_batch, rank, world, cursor)
    feed = RayFeed(learner, stream, mine, board, generation[0], schedule, window, cfg.train.max_steps)

    logger: RunLogger = config["logger"]
    # rank 0's machine (its GPU included) beside the driver's: system/learner_0/...
    with logger.system_metrics("learner_0") if rank == 0 else contextlib.nullcontext():
        totals = train_loop(learner, feed, RayTrainSink(rank), log=logger.log_metrics if rank == 0 else None,
                            label=config["label"], prefix=config["prefix"], on_step=config["on_step"])

    nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1:
        nodes = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return {**totals, "learner_nodes": nodes}


def _starting_checkpoint(cfg, driver_checkpoint: "ray.ObjectRef | None") -> dict | None:
    """Ray Train's newest checkpoint of this run (after a learner restart, or a re-submitted job), or the one
    the driver found in the run directory when it is newer (a run that went on in process)."""
    candidates = []
    ray_checkpoint = ray.train.get_checkpoint()
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as directory:
            candidates.append(check_resumable(Path(directory) / "checkpoint.pt", cfg))
    if driver_checkpoint is not None:
        candidates.append(ray.get(driver_checkpoint))
    return max(candidates, key=lambda c: c["step"], default=None)  # max keeps the first (Ray's) on a tie
