"""The driver side of one training on Ray: weight board, episode workers and a TorchTrainer, in one call.

Checkpoints live where Ray Train keeps them: RunConfig(name=run_dir.name, storage_path=run_dir.parent), so
Ray's own directory for the run *is* run_dir, or under tracking.storage (a URI: s3://, gs://, ...), in which
case the last one is downloaded to run_dir/checkpoint.pt. A learner failure restarts from the newest of them
(FailureConfig); calling `fit` again for the same run_dir (a re-submitted job) resumes from the newest
checkpoint in run_dir (Ray's, or an in-process one), after the driver has checked that it may be resumed.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import ray
from ray.train import (
    CheckpointConfig, ControllerError, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError,
    UserCallback, WorkerGroupError,
)
from ray.train.torch import TorchConfig, TorchTrainer

from iai_dist import checkpoint
from iai_dist.config import DistributedConfig, ExperimentConfig
from iai_dist.learner import ServiceError
from iai_dist.rollout import Transitions
from iai_dist.service.board import WeightBoard
from iai_dist.service.episode_worker import EpisodeWorker
from iai_dist.service.feed import error_line
from iai_dist.service.learner_loop import learner_loop
from iai_dist.tracking import RunLogger


REPORT_POLL_S = 0.1
UNPLACED = ("WorkerGroupStartupTimeoutError", "InsufficientClusterResourcesError")


@dataclass
class FitResult:
    checkpoint: Path  # run_dir/checkpoint.pt: the final state, where evaluate and the in-process path look
    service: dict  # rank 0's figures for the last learner attempt (steps, episodes, transitions, idle %)
    workers: list[dict]  # per episode worker: pid, node, whether Ray restarted it, batches since


def episode_worker_name(run_dir: Path, label: str, index: int) -> str:
    """Actor names, so `ray list actors` (and a test that kills one) can find them."""
    return f"{run_dir.name}:{label}:episode-worker-{index}"


def training_failure(error: TrainingFailedError) -> str:
    """What a learner (or Ray Train's controller) raised, on one line."""
    if isinstance(error, WorkerGroupError) and error.worker_failures:
        return error_line(next(iter(error.worker_failures.values())))
    if isinstance(error, ControllerError):
        return error_line(error.controller_failure)
    return error_line(error)


def learner_resources(d: DistributedConfig) -> dict[str, float]:
    """What one learner (a Ray Train worker) reserves."""
    return {"CPU": d.learner_cpus, **({"GPU": d.learner_gpus} if d.use_gpu else {})}


def episode_worker_resources(d: DistributedConfig) -> dict[str, float]:
    """What one episode-worker actor reserves."""
    return {"CPU": d.episode_worker_cpus, **({"GPU": d.episode_worker_gpus} if d.use_gpu else {})}


def newest_checkpoint(run_dir: Path, cfg: ExperimentConfig) -> tuple[Path, dict] | None:
    """The newest checkpoint of the run and its contents; a clear error if it cannot be resumed under `cfg`
    (unreadable, not ours, a change of what must not change), never a silent fresh start."""
    path = checkpoint.newest(run_dir) if run_dir.is_dir() else None
    return None if path is None else (path, checkpoint.check_resumable(path, cfg))


def fit(
    cfg: ExperimentConfig,
    run_dir: Path,
    logger: RunLogger | None = None,
    label: str = "refiner",
    prefix: str = "train/",
    on_step: Callable[[int, int, Transitions], None] | None = None,
    callbacks: Sequence[UserCallback] = (),
) -> FitResult:
    """Train `cfg` on the connected Ray cluster into run_dir, resuming from its newest checkpoint.

    `on_step(rank, step, transitions)` is called by every learner after each step: fault injection in tests.
    `callbacks` are Ray Train callbacks (a sweep's trial passes Tune's, which forwards every report).
    """
    d = cfg.distributed
    run_dir = run_dir.resolve()
    # Ray Train's controller takes a worker's report every health-check interval (2 s by default), and a
    # worker's next report waits for that: reports at every log step cost up to 2 s each (measured: 20 reports
    # of a tiny run, 38 s). The driver's value reaches the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(REPORT_POLL_S))
    # Learners that cannot be placed (autoscaling included) within this long fail the run with one line, once
    # (controller_failure_limit=0 below), instead of Ray Train retrying the placement forever.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(d.placement_timeout_s)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # we say "resuming from step N" ourselves
    found = newest_checkpoint(run_dir, cfg)
    if found is not None:
        print(f"[{label}] resuming from step {found[1]['step']} ({found[0].relative_to(run_dir.parent)})", flush=True)
    cfg_data = cfg.model_dump(mode="json")
    board_name = f"{run_dir.name}:{label}:weight-board"
    # restartable: it comes back empty and the learners hand it the weights still needed (feed.RayFeed)
    board = ray.remote(num_cpus=0)(WeightBoard).options(name=board_name, max_restarts=-1, max_task_retries=-1).remote()
    worker_cls, worker = ray.remote(EpisodeWorker), episode_worker_resources(d)
    workers = [
        worker_cls.options(
            name=episode_worker_name(run_dir, label, i),
            num_cpus=worker["CPU"],
            num_gpus=worker.get("GPU", 0),
            max_restarts=d.worker_restarts,
            max_task_retries=-1,  # a request in flight when the worker died is re-run on its restart
        ).remote(cfg_data, i, board_name, d.use_gpu)
        for i in range(d.episode_workers)
    ]
    trainer = TorchTrainer(
        learner_loop,
        train_loop_config={"config": cfg_data, "board": board, "episode_workers": workers, "on_step": on_step,
                           "logger": logger or RunLogger(), "label": label, "prefix": prefix,
                           "driver_checkpoint": None if found is None else ray.put(found[1])},
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                     resources_per_worker=learner_resources(d)),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=cfg.tracking.storage or str(run_dir.parent),
            failure_config=FailureConfig(max_failures=d.max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),  # not a line per ray.train.report
            callbacks=list(callbacks),
        ),
    )
    try:
        result = trainer.fit()
        infos = ray.get([w.info.remote() for w in workers])
    except TrainingFailedError as exc:  # after Ray Train's own retries: one line, the learner's own error
        if isinstance(exc, ControllerError) and type(exc.controller_failure).__name__ in UNPLACED:
            raise ServiceError(
                f"[{label}] the {d.num_workers} learner(s) ({learner_resources(d)} each) were not placed within "
                f"{d.placement_timeout_s:g}s (distributed.placement_timeout_s): the cluster lacks, or could not scale "
                f"up to, those resources") from None
        raise ServiceError(f"[{label}] training failed: {training_failure(exc)}") from None
    finally:
        for actor in (*workers, board):
            ray.kill(actor, no_restart=True)
    final = run_dir / "checkpoint.pt"
    run_dir.mkdir(parents=True, exist_ok=True)  # on remote storage Ray Train wrote nothing here
    if cfg.tracking.storage and result.checkpoint is not None:  # remote storage: the last one, downloaded
        with result.checkpoint.as_directory() as directory:
            _copy_atomically(Path(directory) / "checkpoint.pt", final)
    source = checkpoint.newest(run_dir)  # Ray's last, or the one this fit started from when nothing was left to do
    if source != final:
        _copy_atomically(source, final)
    return FitResult(final, result.return_value or {}, infos)


def _copy_atomically(source: Path, target: Path) -> None:
    """A reader of `target` sees the old file or the whole new one, never part of it."""
    shutil.copyfile(source, target.with_suffix(".tmp"))
    os.replace(target.with_suffix(".tmp"), target)
