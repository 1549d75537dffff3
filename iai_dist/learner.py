"""The greedy learner: its step, its state, and the one loop that every path runs.

Read top to bottom (the objective itself is in objective.py):
- learner_step: one optimizer step on the greedy objective's losses, exact under data parallelism: N ranks
  take the very step that one process would take on the union of their transitions.
- Learner: what a checkpoint restores about learning (model, optimizer, step, skip counters, RNG).
- train_loop: take this rank's batch for the step from an experience source, learn, and on schedule log,
  report and checkpoint through a sink. In process and on every Ray Train rank, the same function.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from iai_dist import checkpoint
from iai_dist.compiling import compiled
from iai_dist.config import ExperimentConfig, TrainConfig
from iai_dist.devices import precision_line, resolve_device
from iai_dist.experience import EpisodeStream, ExperienceSource, LocalRollouts, rollout_steps
from iai_dist.objective import GreedyObjective, greedy_backward, world_size
from iai_dist.refiner import IterativeModel
from iai_dist.regimes.explicit import PRETRAIN_TASKS
from iai_dist.reporting import Window, progress_line, step_metrics
from iai_dist.rollout import Transitions, refine, rolled_out
from iai_dist.tasks import Episode, build_family


class TrainingDiverged(RuntimeError):
    pass


class ServiceError(RuntimeError):
    """The experience source failed in a way that retrying will not fix (an episode worker that crashes every
    time, a feed that stays silent); the message is one line for the user, naming the setting to change."""


@dataclass
class StepStats:
    """One learner step, over the global batch (every rank's transitions), as tensors on the learner's device:
    reading one makes the host wait for the GPU, so the loop reads them only at log steps (`read`)."""

    loss: torch.Tensor  # the objective's value: mean log query loss per step (relative) or mean query loss (uniform)
    step_losses: torch.Tensor  # [K] mean query loss after each refinement step (index i = after step i+1)
    step_errors: torch.Tensor  # [K] query error % after each refinement step, pooled over the batch
    grad_norm: torch.Tensor
    skipped: torch.Tensor  # 1 where a non-finite loss or gradient stopped the update, else 0

    def read(self) -> "StepValues":
        return StepValues(float(self.loss), self.step_losses.tolist(), self.step_errors.tolist(),
                          float(self.grad_norm), bool(self.skipped))


@dataclass
class StepValues:
    """StepStats read to the host: what progress lines and metrics show."""

    loss: float
    step_losses: list[float]
    step_errors: list[float]
    grad_norm: float
    skipped: bool


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total` (and min_ratio after it)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def learner_step(objective: torch.nn.Module, optimizer: torch.optim.Optimizer, tr: Transitions, cfg: TrainConfig,
                 lr: float, k: int) -> StepStats:
    """One greedy step at learning rate `lr` on a task of K = k steps. `objective` is a GreedyObjective, or one
    wrapped in DDP."""
    objective.train()
    optimizer.zero_grad(set_to_none=True)
    value, step_losses, errors = greedy_backward(objective, tr, cfg, k)
    # Decide on the gradient norm, not the local loss: under DDP every rank holds the same averaged
    # gradients, so all ranks skip (or take) a non-finite step together and stay in lock-step. The decision
    # stays on the device: the fused AdamW leaves parameters, moments and its step count alone where
    # found_inf is 1, so no step waits for the GPU to say whether it may update.
    grad_norm = torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.grad_clip)
    skipped = (~torch.isfinite(grad_norm)).float()
    optimizer.found_inf = skipped
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(value.detach(), step_losses, errors, grad_norm.detach(), skipped)


def param_groups(model: IterativeModel, cfg: ExperimentConfig) -> list[dict]:
    """AdamW groups: weight decay on matrices (not embeddings, norms, biases, initial states), then none; where
    regime.f_gamma_lr_scale is not 1, the explicit f_gamma's in groups of their own after those, whose
    `lr_scale` multiplies the scheduled lr (groups without one, as in older checkpoints, have 1)."""
    groups: dict[tuple[bool, bool], dict] = {}
    for name, p in model.named_parameters():
        decay = p.ndim >= 2 and "emb" not in name
        scale = cfg.regime.f_gamma_lr_scale if name.startswith("regime.f_gamma.") else 1.0
        group = groups.setdefault((not decay, scale != 1.0), {
            "params": [], "weight_decay": cfg.train.weight_decay if decay else 0.0, "lr_scale": scale})
        group["params"].append(p)
    return [groups[key] for key in sorted(groups)]


class Learner:
    """What a checkpoint restores about learning: model, optimizer, learner step, skip counters, torch RNG.

    The learning rate is a function of the step (warmup, then cosine to train.max_steps); a skipped step
    (non-finite loss or gradient) makes no update but still counts, so the schedule reaches its end. Under an
    initialised process group of several ranks (Ray Train) the objective is wrapped in DDP.
    """

    def __init__(self, cfg: ExperimentConfig, device: torch.device | str | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device) if device is None else torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        torch.manual_seed(cfg.train.seed)
        self.family = build_family(cfg.task)
        self.model = IterativeModel(cfg, self.family).to(self.device)
        tc = cfg.train
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg), lr=tc.lr, fused=True)
        self.step = 0  # learner steps taken, skipped ones included
        self._skips = torch.zeros(2, device=self.device)  # [skipped steps, non-finite steps in a row], on device
        if tc.compile == "refiner":
            self.model.refiner.compile()  # in place: state_dict keys (and checkpoints) stay the same
        self.roll = compiled(rolled_out, tc.compile)  # what rolls out this learner's own episodes (in process)
        self.world = world_size()
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.objective: torch.nn.Module = GreedyObjective(self.model, tc.unroll, tc.compile)
        if self.world > 1:
            self.objective = torch.nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self._heldout: Episode | None = None

    def pretrain(self) -> None:
        """At a fresh start (never on resume): fit the explicit regime's f_gamma before meta-training
        (regime.pretrain_steps). Every rank computes the same; rank 0's copy is made everyone's."""
        steps = self.cfg.regime.pretrain_steps
        if not steps:
            return
        start = time.perf_counter()
        loss = self.model.regime.pretrain(self.cfg.train.seed, steps)
        if self.world > 1:
            for tensor in self.model.state_dict().values():
                dist.broadcast(tensor, 0)
        if self.rank == 0:
            print(f"[pretrain] f_gamma auto-decoded for {steps} steps on {PRETRAIN_TASKS} episodes: loss {loss:.4g} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        tc = self.cfg.train
        return tc.lr * lr_multiplier(self.step, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)

    @property
    def skipped(self) -> int:
        """Learner steps skipped for a non-finite loss or gradient (reads the device)."""
        return int(self._skips[0])

    @property
    def nonfinite_in_row(self) -> int:
        return int(self._skips[1])

    def learn(self, tr: Transitions) -> StepStats:
        """One learner step. A run of train.max_nonfinite_in_row non-finite steps stops training; the count is
        read from the device only every that many steps (and by `check_diverged` at log steps), so it stops
        at most that many steps after the run began to fail, without a sync per step."""
        stats = learner_step(self.objective, self.optimizer, tr if tr.x.device == self.device else tr.to(self.device),
                             self.cfg.train, self.lr, self.cfg.task.steps)
        self.step += 1
        self._skips = torch.stack([self._skips[0] + stats.skipped, (self._skips[1] + 1) * stats.skipped])
        if self.step % self.cfg.train.max_nonfinite_in_row == 0:
            self.check_diverged()
        return stats

    def check_diverged(self) -> None:
        in_row = self.nonfinite_in_row
        if in_row >= self.cfg.train.max_nonfinite_in_row:
            raise TrainingDiverged(
                f"{in_row} learner steps in a row had a non-finite loss or gradient (at step {self.step}); "
                f"lower train.lr (now {self.cfg.train.lr}) or train.grad_clip"
            )

    def heldout_errors(self) -> list[float]:
        """Query error % after steps 1..horizon x K on fixed held-out episodes (eval.seed + 2): the monitored
        curve, over the steps that training learns from."""
        n = self.cfg.eval.monitor_episodes
        if n == 0:
            return []
        if self._heldout is None:
            self._heldout = self.family.sample(self.cfg.eval.seed + 2, torch.arange(n), device=self.device, split="test",
                                               num_batches=rollout_steps(self.cfg))
        self.model.eval()
        terms = torch.stack(refine(self.model, self._heldout)[1:]).sum(-1)  # [horizon x K, 2]
        return (100.0 * terms[:, 0] / terms[:, 1]).tolist()

    def state_dict(self) -> dict:
        return {
            "format": checkpoint.CHECKPOINT_FORMAT,
            "config": self.cfg.model_dump(mode="json"),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "skipped": self.skipped,
            "nonfinite_in_row": self.nonfinite_in_row,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group in self.optimizer.param_groups:  # checkpoints from before the fused optimizer say otherwise
            group.update(fused=True, foreach=None)
        self.step = ckpt["step"]
        self._skips = torch.tensor([ckpt["skipped"], ckpt["nonfinite_in_row"]], dtype=torch.float32, device=self.device)
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt["cuda_rng"] and torch.cuda.is_available():  # a process may see fewer GPUs than the one that saved
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"][:torch.cuda.device_count()])


def resume(learner: Learner, ckpt: dict) -> int:
    """Restore a learner from a checkpoint that check_resumable accepted; returns its episode cursor, checked:
    every learner step learns from tasks_per_batch episodes."""
    tasks = learner.cfg.train.tasks_per_batch
    if ckpt["episodes"] != ckpt["step"] * tasks:
        raise checkpoint.CheckpointError(
            f"checkpoint at learner step {ckpt['step']} has learned from {ckpt['episodes']} episodes, not "
            f"{ckpt['step']} x {tasks}: it is inconsistent and cannot be resumed"
        )
    learner.load_state_dict(ckpt)
    return ckpt["episodes"]


class CheckpointSink(Protocol):
    """Where the loop's reports go: every rank calls `report` at every log and checkpoint step; `state` is the
    checkpoint at checkpoint steps (rank 0's is the one kept), else None."""

    def report(self, metrics: dict, state: dict | None) -> None: ...


class FileSink:
    """Checkpoints to one file (atomically); None keeps none. Metrics go to the loop's `log` instead."""

    def __init__(self, path: Path | None):
        self.path = path

    def report(self, metrics: dict, state: dict | None) -> None:
        if state is not None and self.path is not None:
            checkpoint.save(state, self.path)


def _summed(values: list[float], device: torch.device, op=None) -> list[float]:
    """Values summed (or reduced by `op`) over the ranks; as they are in a single process."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def train_loop(
    learner: Learner,
    source: ExperienceSource,
    sink: CheckpointSink,
    log: Callable[[dict, int], None] | None = None,
    label: str = "refiner",
    prefix: str = "train/",
    stop_at: int | None = None,
    on_step: Callable[[int, int, Transitions], None] | None = None,
    progress: bool = True,
) -> dict:
    """Train to train.max_steps (or `stop_at`). Every log_every steps rank 0 prints a progress line and calls
    `log(metrics, step)`; every checkpoint_every steps (and at the end) the checkpoint goes to `sink`, which
    every rank reports to at each of those steps (on Ray a barrier). `on_step(rank, step, transitions)`
    runs after every step (tests inject faults and keep an episode ledger with it). Returns the steady-state
    figures: every log window after the first, which holds start-up."""
    tc = learner.cfg.train
    stream = source.stream
    end = tc.max_steps if stop_at is None else min(stop_at, tc.max_steps)
    start_step = learner.step
    if progress and learner.rank == 0:
        sys.stdout.write(precision_line(learner.cfg.train.autocast, learner.device) + "\n")
        if start_step:
            sys.stdout.write(f"[{label}] resumed at learner step {start_step} (episode {stream.start})\n")
    begin = last = time.perf_counter()
    last_step = learner.step
    window = [0.0, 0.0, 0.0, 0.0]  # transitions, waited seconds, lag sum, lag max (this rank, this window)
    steady = {"seconds": 0.0, "transitions": 0.0, "waited_s": 0.0}
    while learner.step < end:
        tr, waited = source.next(learner.step)
        stream.take(tr, learner.step)
        lag = learner.step - tr.version
        stats = learner.learn(tr)
        source.learned(learner)
        window = [window[0] + tr.num_rows, window[1] + waited, window[2] + lag, max(window[3], lag)]
        if on_step is not None:
            on_step(learner.rank, learner.step, tr)
        log_now = learner.step % tc.log_every == 0 or learner.step == tc.max_steps
        saving = learner.step % tc.checkpoint_every == 0 or learner.step == end
        if not (log_now or saving):
            continue
        now = time.perf_counter()
        sums = _summed(window[:3], learner.device)
        lag_max = _summed(window[3:], learner.device, dist.ReduceOp.MAX)[0]
        w = Window(learner.step - last_step, now - last, sums[0], sums[1], sums[2], lag_max, learner.world)
        if last_step > start_step:
            steady = {"seconds": steady["seconds"] + w.seconds, "transitions": steady["transitions"] + w.transitions,
                      "waited_s": steady["waited_s"] + w.waited_s / w.ranks}
        learner.check_diverged()
        metrics: dict[str, float] = {}
        if learner.rank == 0:
            values = stats.read()
            heldout = learner.heldout_errors()
            metrics = step_metrics(prefix, learner, values, w, heldout)
            if progress:  # not print(): Ray Train patches it into a logger that echoes it, so lines came twice
                sys.stdout.write(progress_line(label, learner, values, w, heldout, now - begin) + "\n")
                sys.stdout.flush()
            if log is not None:
                log(metrics, learner.step)
            # what a sweep schedules on (Tune sees the reports): the error after step K, under a key that does not
            # depend on K
            metrics.update(learner_step=learner.step,
                           heldout_error=(heldout or values.step_errors)[learner.cfg.task.steps - 1])
        state = None
        if saving:  # the episode cursor as counted: every batch learned from, on every rank
            episodes = stream.start + int(_summed([float(stream.taken)], learner.device)[0])
            state = {**learner.state_dict(), "episodes": episodes, "experience": source.state_dict()}
        sink.report(metrics, state)
        window = [0.0, 0.0, 0.0, 0.0]
        last, last_step = time.perf_counter(), learner.step
    return {
        "start_step": start_step,
        "steps": learner.step,
        "skipped": learner.skipped,
        "episodes": stream.start + int(_summed([float(stream.taken)], learner.device)[0]),
        "seconds": steady["seconds"],
        "transitions": steady["transitions"],
        "learner_idle_pct": 100.0 * steady["waited_s"] / max(steady["seconds"], 1e-9),
    }


def train_in_process(
    cfg: ExperimentConfig,
    checkpoint_path: Path | None,
    resume_from: Path | None = None,
    device: torch.device | str | None = None,
    **loop_options,
) -> tuple[Learner, dict]:
    """Train in this process (distributed.num_workers = 0), resuming from `resume_from` (default: the
    checkpoint file, if it exists) and checkpointing to `checkpoint_path` (None: keep none)."""
    learner = Learner(cfg, device)
    if resume_from is None and checkpoint_path is not None and checkpoint_path.exists():
        resume_from = checkpoint_path
    if resume_from is None:
        learner.pretrain()
    cursor = 0 if resume_from is None else resume(learner, checkpoint.check_resumable(resume_from, cfg))
    source = LocalRollouts(learner, EpisodeStream(cfg.train.tasks_per_batch, cursor=cursor))
    return learner, train_loop(learner, source, FileSink(checkpoint_path), **loop_options)
