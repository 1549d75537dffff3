"""The driver side of one training on Ray: weight board, episode workers and a TorchTrainer, in one call.

Checkpoints live where Ray Train keeps them: RunConfig(name=run_dir.name, storage_path=run_dir.parent),
so Ray's own directory for the run *is* run_dir. A learner failure restarts from the newest of them
(FailureConfig); calling `fit` again for the same run_dir (a re-submitted job) resumes from it too, after
the driver has checked that it is readable and was written under the same config.
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
    CheckpointConfig, FailureConfig, LoggingConfig, Result, RunConfig, ScalingConfig, UserCallback,
)
from ray.train.torch import TorchConfig, TorchTrainer

from iai_dist.config import ExperimentConfig
from iai_dist.service.episode_worker import EpisodeWorker, WeightBoard
from iai_dist.service.learner_loop import learner_loop
from iai_dist.tracking import RunLogger
from iai_dist.training import CheckpointError, check_resumable


@dataclass
class FitResult:
    checkpoint: Path  # run_dir/checkpoint.pt: the final state, where evaluate and the in-process path look
    service: dict  # rank 0's figures for the last learner attempt (steps, transitions, idle %, dropped)
    workers: list[dict]  # per episode worker: pid, node, whether Ray restarted it, batches since
    cursors: list[int]  # per episode worker: batches of its slice consumed


def episode_worker_name(run_dir: Path, label: str, index: int) -> str:
    """Actor names, so `ray list actors` (and a test that kills one) can find them."""
    return f"{run_dir.name}:{label}:episode-worker-{index}"


def latest_checkpoint(run_dir: Path, cfg: ExperimentConfig) -> tuple[Path, dict] | None:
    """The newest checkpoint Ray Train kept for this run and its contents; a clear error if it cannot be
    resumed under `cfg` (unreadable, not ours, another config), never a silent fresh start."""
    if not run_dir.is_dir():
        return None
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # we say "resuming from step N" ourselves
    try:
        result = Result.from_path(str(run_dir))
    except RuntimeError as exc:
        if "doesn't exist" in str(exc):
            return None  # no Ray Train records: a fresh run
        raise CheckpointError(f"{run_dir}: Ray Train's checkpoint records cannot be read ({exc})") from None
    except Exception as exc:  # a damaged snapshot file surfaces as JSON / key errors
        raise CheckpointError(
            f"{run_dir}: Ray Train's checkpoint records cannot be read ({type(exc).__name__}: {exc})"
        ) from None
    if result.checkpoint is None:
        return None
    path = Path(result.checkpoint.path) / "checkpoint.pt"
    return path, check_resumable(path, cfg)


def fit(
    cfg: ExperimentConfig,
    run_dir: Path,
    logger: RunLogger | None = None,
    label: str = "refiner",
    prefix: str = "train/",
    on_step: Callable[[int, int], None] | None = None,
    callbacks: Sequence[UserCallback] = (),
) -> FitResult:
    """Train `cfg` on the connected Ray cluster into run_dir, resuming from its last checkpoint.

    `on_step(rank, step)` is called by every learner after each step: fault injection in tests.
    `callbacks` are Ray Train callbacks (a sweep's trial passes Tune's, which forwards every report).
    """
    d = cfg.distributed
    run_dir = run_dir.resolve()
    found = latest_checkpoint(run_dir, cfg)
    if found is not None:
        print(f"[{label}] resuming from step {found[1]['step']} ({found[0].parent.name})", flush=True)
    cfg_data = cfg.model_dump(mode="json")
    board_name = f"{run_dir.name}:{label}:weight-board"
    board = ray.remote(num_cpus=0)(WeightBoard).options(name=board_name).remote()
    worker_cls = ray.remote(EpisodeWorker)
    workers = [
        worker_cls.options(
            name=episode_worker_name(run_dir, label, i),
            num_cpus=d.episode_worker_cpus,
            num_gpus=d.episode_worker_gpus if d.use_gpu else 0,
            max_restarts=d.worker_restarts,
            max_task_retries=-1,  # a request in flight when the worker died is re-run on its restart
        ).remote(cfg_data, i, board_name, d.use_gpu)
        for i in range(d.episode_workers)
    ]
    trainer = TorchTrainer(
        learner_loop,
        train_loop_config={"config": cfg_data, "board": board, "episode_workers": workers, "on_step": on_step,
                           "logger": logger or RunLogger(), "label": label, "prefix": prefix},
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                     resources_per_worker={"CPU": d.learner_cpus, **({"GPU": 1} if d.use_gpu else {})}),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=d.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),  # not a line per ray.train.report
            callbacks=list(callbacks),
        ),
    )
    try:
        result = trainer.fit()
        infos = ray.get([w.info.remote() for w in workers])
    finally:
        for actor in (*workers, board):
            ray.kill(actor, no_restart=True)
    final = run_dir / "checkpoint.pt"
    source = Path(result.checkpoint.path) / "checkpoint.pt"
    shutil.copyfile(source, final.with_suffix(".tmp"))
    os.replace(final.with_suffix(".tmp"), final)
    ckpt = check_resumable(final, cfg)
    return FitResult(final, result.return_value or {}, infos, ckpt["episode_cursors"])
