"""In-process greedy meta-training (distributed.num_workers = 0), with checkpoints that resume exactly.

Read top to bottom: build the family, model and optimizer; each learner step samples the next slice of
the episode stream, rolls out transitions with the current refiner and takes one greedy step.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

import torch

from iai_dist.config import ExperimentConfig, flatten, validate
from iai_dist.learner import GreedyObjective, StepStats, learner_step
from iai_dist.refiner import IterativeModel
from iai_dist.rollout import Transitions, make_transitions, refine
from iai_dist.tasks import Episode, build_family

CHECKPOINT_FORMAT = 1


class TrainingDiverged(RuntimeError):
    pass


class CheckpointError(ValueError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Holds everything a checkpoint must restore: model, optimizer, scheduler, step, episode cursor."""

    def __init__(self, cfg: ExperimentConfig, device: torch.device | str | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device) if device is None else torch.device(device)
        torch.manual_seed(cfg.train.seed)
        self.family = build_family(cfg.task)
        self.model = IterativeModel(cfg, self.family).to(self.device)
        tc = cfg.train
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "emb" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and "emb" not in n)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tc.lr,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
        )
        self.step = 0  # learner steps taken (skipped ones included)
        self.cursor = 0  # next episode index of the training stream
        self.nonfinite_in_row = 0
        self.skipped = 0
        if tc.compile:
            self.model.refiner.compile()  # in place: state_dict keys (and checkpoints) stay the same
        # What learner_step differentiates; the Ray learner wraps it in DistributedDataParallel.
        self.objective: torch.nn.Module = GreedyObjective(self.model)
        self._heldout: Episode | None = None

    def next_episodes(self) -> Episode:
        t = self.cfg.train.tasks_per_batch
        indices = torch.arange(self.cursor, self.cursor + t)
        self.cursor += t
        return self.family.sample(self.cfg.train.seed, indices, device=self.device)

    def train_step(self) -> StepStats:
        """In process: roll out the next episodes with the current refiner, then learn from them."""
        return self.learn(make_transitions(self.model, self.next_episodes(), version=self.step))

    def learn(self, transitions: Transitions) -> StepStats:
        stats = learner_step(
            self.objective, self.optimizer, self.scheduler, transitions, self.cfg.train, self.cfg.task.steps
        )
        self.step += 1
        if stats.skipped:
            self.skipped += 1
            self.nonfinite_in_row += 1
            if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row:
                raise TrainingDiverged(
                    f"{self.nonfinite_in_row} learner steps in a row had a non-finite loss or gradient "
                    f"(at step {self.step}); lower train.lr (now {self.cfg.train.lr}) or train.grad_clip"
                )
        else:
            self.nonfinite_in_row = 0
        return stats

    def heldout_errors(self) -> list[float]:
        """Query error % after steps 1..K on fixed held-out episodes (eval.seed + 2): the monitored curve."""
        n = self.cfg.eval.monitor_episodes
        if n == 0:
            return []
        if self._heldout is None:
            self._heldout = self.family.sample(self.cfg.eval.seed + 2, torch.arange(n), device=self.device, split="test")
        self.model.eval()
        terms = torch.stack(refine(self.model, self._heldout)[1:]).sum(-1)  # [K, 2]
        return (100.0 * terms[:, 0] / terms[:, 1]).tolist()

    # -- checkpoints --
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.model_dump(mode="json"),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "cursor": self.cursor,
            "nonfinite_in_row": self.nonfinite_in_row,
            "skipped": self.skipped,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def save(self, path: str | Path) -> Path:
        """Atomic: a crash mid-write never leaves a half-written checkpoint in place of a good one."""
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def load_state_dict(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step, self.cursor = ckpt["step"], ckpt["cursor"]
        self.nonfinite_in_row, self.skipped = ckpt["nonfinite_in_row"], ckpt["skipped"]
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])


def read_checkpoint(path: str | Path) -> tuple[dict, ExperimentConfig]:
    """Load a checkpoint file and its config, with a clear error for anything that is not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not an iai_dist checkpoint of format {CHECKPOINT_FORMAT}")
    return ckpt, validate(ckpt["config"], f"config in {path}")


def train(
    cfg: ExperimentConfig,
    checkpoint_path: Path | None,
    on_log: Callable[[Trainer, StepStats, float, list[float]], None] | None = None,
    device: torch.device | str | None = None,
    stop_at: int | None = None,
) -> Trainer:
    """Train to cfg.train.max_steps (or stop early at `stop_at`), resuming from `checkpoint_path` if it exists
    (None: keep no checkpoint)."""
    trainer = Trainer(cfg, device)
    if checkpoint_path is not None and checkpoint_path.exists():
        trainer.load_state_dict(check_resumable(checkpoint_path, cfg))
    tc = cfg.train
    last_time, last_step = time.perf_counter(), trainer.step
    end = tc.max_steps if stop_at is None else min(stop_at, tc.max_steps)
    while trainer.step < end:
        stats = trainer.train_step()
        if trainer.step % tc.log_every == 0 or trainer.step == tc.max_steps:
            now = time.perf_counter()
            rate = (trainer.step - last_step) / max(now - last_time, 1e-9)
            last_time, last_step = now, trainer.step
            if on_log is not None:
                on_log(trainer, stats, rate, trainer.heldout_errors())
        if checkpoint_path is not None and (trainer.step % tc.checkpoint_every == 0 or trainer.step == end):
            trainer.save(checkpoint_path)
    return trainer


def check_resumable(checkpoint_path: Path, cfg: ExperimentConfig) -> dict:
    """The checkpoint, if it was written under this very config (tracking aside); else a clear error."""
    ckpt, saved = read_checkpoint(checkpoint_path)
    old, new = flatten(saved), flatten(cfg)
    diff = [k for k in old if not k.startswith("tracking.") and old[k] != new.get(k)]
    if diff:
        raise CheckpointError(
            f"{checkpoint_path} was written with a different config ({diff[0]}: {old[diff[0]]!r} there, "
            f"{new.get(diff[0])!r} now); use another run name"
        )
    return ckpt


def report_steps(k: int, horizon: int) -> list[int]:
    """The refinement steps tables and progress lines show: 1, 2, 5, K, 2K and the last one."""
    return sorted({s for s in (1, 2, 5, k, 2 * k, horizon) if 1 <= s <= horizon})


def progress_line(label: str, trainer: Trainer, stats: StepStats, rate: float, heldout: list[float],
                  elapsed: float, extra: str = "") -> str:
    """One log line: step, rate, loss, held-out query error after steps 1, 2, 5, K (the training batch's
    when there is no held-out set), lr, skipped steps, time; `extra` for the Ray service's figures."""
    errors, where = (heldout, "held-out") if heldout else (stats.step_errors, "batch")
    errs = " ".join(f"@{s}:{errors[s - 1]:.3g}%" for s in report_steps(len(errors), len(errors)))
    tc = trainer.cfg.train
    return (
        f"[{label}] step {trainer.step:>6}/{tc.max_steps} | {rate:6.2f} it/s {rate * tc.tasks_per_batch:7.0f} "
        f"episodes/s | loss {stats.loss:8.4f} | {where} error {errs} | lr {trainer.scheduler.get_last_lr()[0]:.2e} "
        f"| skipped {trainer.skipped}{extra} | {elapsed:6.0f}s"
    )


def step_metrics(prefix: str, trainer: Trainer, stats: StepStats, rate: float, heldout: list[float]) -> dict[str, float]:
    """The per-step metrics every path logs (MLflow names): `<prefix>loss`, rates, lr, the training batch's
    query error and the held-out query error after each refinement step."""
    tc, k = trainer.cfg.train, trainer.cfg.task.steps
    metrics = {
        f"{prefix}loss": stats.loss,
        f"{prefix}steps_per_s": rate,
        f"{prefix}episodes_per_s": rate * tc.tasks_per_batch,
        f"{prefix}transitions_per_s": rate * tc.tasks_per_batch * k,
        f"{prefix}lr": trainer.scheduler.get_last_lr()[0],
        f"{prefix}skipped": trainer.skipped,
    }
    metrics.update({f"{prefix}query_error/step_{i + 1}": e for i, e in enumerate(stats.step_errors)})
    metrics.update({f"{prefix}heldout_error/step_{i + 1}": e for i, e in enumerate(heldout)})
    return metrics
