"""What training shows: the progress line and the per-step metric names, the same on every path.

MLflow names (under a prefix: `train/` for the refiner, `one_step/` for the one-step model):
loss, lr, skipped, steps_per_s, episodes_per_s, transitions_per_s, learner_idle_pct (share of the time the
learner waited for transitions: rollouts in process, the feed on Ray), staleness_mean / staleness_max (learner
steps between the weights that rolled a batch out and the weights that learn from it), query_error/step_i
(the training batch) and heldout_error/step_i (fixed held-out episodes).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Window:
    """Figures of the learner steps since the last log step, summed over ranks."""

    steps: int
    seconds: float
    transitions: float
    waited_s: float  # summed over ranks
    lag_sum: float  # summed over ranks
    lag_max: float
    ranks: int = 1

    @property
    def steps_per_s(self) -> float:
        return self.steps / max(self.seconds, 1e-9)

    @property
    def idle_pct(self) -> float:
        return 100.0 * self.waited_s / max(self.ranks * self.seconds, 1e-9)

    @property
    def staleness_mean(self) -> float:
        return self.lag_sum / max(self.steps * self.ranks, 1)


def report_steps(k: int, horizon: int) -> list[int]:
    """The refinement steps tables and progress lines show: 1, 2, 5, K, 2K and the last one."""
    return sorted({s for s in (1, 2, 5, k, 2 * k, horizon) if 1 <= s <= horizon})


def duration(seconds: float) -> str:
    """A time at a glance: 45s, 7m12s, 2h05m."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    return f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_line(label: str, learner, stats, window: Window, heldout: list[float], elapsed: float) -> str:
    """One log line: step, rate, loss, held-out query error after steps 1, 2, 5, K (and 2K, and the last one
    trained on, under train.horizon; the training batch's when there is no held-out set), lr, skipped steps,
    the learner's idle share and staleness, time so far and the time left at this window's rate."""
    errors, where = (heldout, "held-out") if heldout else (stats.step_errors, "batch")
    errs = " ".join(f"@{s}:{errors[s - 1]:.3g}%" for s in report_steps(learner.cfg.task.steps, len(errors)))
    tc = learner.cfg.train
    rate = window.steps_per_s
    left = duration((tc.max_steps - learner.step) / max(rate, 1e-9))
    return (
        f"[{label}] step {learner.step:>6}/{tc.max_steps} | {rate:6.2f} it/s {rate * tc.tasks_per_batch:7.0f} "
        f"episodes/s | loss {stats.loss:8.4f} | {where} error {errs} | lr {learner.lr:.2e} | skipped "
        f"{learner.skipped} | idle {window.idle_pct:4.1f}% | staleness {window.staleness_mean:.1f} "
        f"(max {window.lag_max:.0f}) | {elapsed:6.0f}s, {left} left"
    )


def step_metrics(prefix: str, learner, stats, window: Window, heldout: list[float]) -> dict[str, float]:
    """The per-step metrics every path logs, by their MLflow names."""
    tc = learner.cfg.train
    rate = window.steps_per_s
    metrics = {
        f"{prefix}loss": stats.loss,
        f"{prefix}steps_per_s": rate,
        f"{prefix}episodes_per_s": rate * tc.tasks_per_batch,
        f"{prefix}transitions_per_s": window.transitions / max(window.seconds, 1e-9),
        f"{prefix}learner_idle_pct": window.idle_pct,
        f"{prefix}staleness_mean": window.staleness_mean,
        f"{prefix}staleness_max": window.lag_max,
        f"{prefix}lr": learner.lr,
        f"{prefix}skipped": learner.skipped,
    }
    metrics.update({f"{prefix}query_error/step_{i + 1}": e for i, e in enumerate(stats.step_errors)})
    metrics.update({f"{prefix}heldout_error/step_{i + 1}": e for i, e in enumerate(heldout)})
    return metrics
