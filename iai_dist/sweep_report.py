"""A sweep's summary: every trial's query error after each refinement step with what it varied, as CSV,
markdown (also printed) and plots. Plain data in, files out; the Tune side builds the rows."""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iai_dist.evaluate import format_error
from iai_dist.reporting import report_steps

STATUS_ORDER = {"finished": 0, "stopped early": 1, "unfinished": 2, "failed": 3}


@dataclass
class TrialRow:
    trial: str
    status: str  # finished | stopped early (by ASHA) | unfinished (the sweep was interrupted) | failed
    params: dict[str, Any]  # the trial's drawn values, as dotted config overrides
    steps: int  # K
    regime: tuple[str, str]  # (kind, signal) the trial ran with
    learner_steps: int  # learner steps trained (the last report's)
    errors: list[float]  # held-out query error % after refinement steps 1, 2, ... (evaluated: to eval.horizon x K;
    # the monitor: to train.horizon x K; may be short or empty)
    source: str  # evaluation | held-out monitor | '' (nothing reported)
    error: str | None  # the failure, one line
    run_dir: Path
    mlflow_run_id: str | None
    sw2: float | None = None  # generative families: sliced W2 of the refiner's samples after step K (held-out tasks)

    @property
    def final(self) -> float | None:
        """Error after step K; None when the trial never got there."""
        return self.errors[self.steps - 1] if len(self.errors) >= self.steps else None

    @property
    def score(self) -> float | None:
        """What trials are ranked by: the samples' sliced W2 where there is one (generative: the flow-matching
        loss is a proxy for sample quality), else the error after step K."""
        return self.sw2 if self.sw2 is not None else self.final


def short_params(params: dict[str, Any]) -> str:
    """'kind=parametric signal=obs': field names without their section, for labels and run names."""
    return " ".join(f"{key.rsplit('.', 1)[-1]}={_fmt(value)}" for key, value in params.items())


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def ordered(rows: list[TrialRow]) -> list[TrialRow]:
    """Finished trials first, best first; then stopped early, unfinished, failed."""
    return sorted(rows, key=lambda r: (STATUS_ORDER[r.status], r.score if r.score is not None else float("inf"), r.trial))


def best_trial(rows: list[TrialRow]) -> TrialRow | None:
    finished = [r for r in rows if r.status == "finished" and r.score is not None]
    return min(finished, key=lambda r: r.score) if finished else None


def _keys(rows: list[TrialRow], but: tuple[str, ...] = ()) -> list[str]:
    """The swept keys in order of first appearance, the seed (the replicate, not a setting) last."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row.params if k not in keys and k not in but]
    return sorted(keys, key=lambda k: k == "train.seed")


def _columns(rows: list[TrialRow]) -> list[int]:
    """The steps tables report: 1, 2, 5, K, 2K and the last, of every trial's K and what it reports past it."""
    return sorted({s for r in rows for s in report_steps(r.steps, max(r.steps, len(r.errors)))})


def write_csv(rows: list[TrialRow], path: Path) -> Path:
    """One row per trial: its values, status, K and the error after every step it reports (past K too; blank past
    a trial's last)."""
    keys, max_k = _keys(rows), max((len(r.errors) for r in rows), default=0)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "status", *keys, "K", "learner_steps", "error_source", "error_at_K",
                         *[f"error_step_{i}" for i in range(1, max_k + 1)], "sw2_at_K", "failure", "mlflow_run_id"])
        for r in ordered(rows):
            writer.writerow([r.trial, r.status, *[r.params.get(k, "") for k in keys], r.steps, r.learner_steps,
                             r.source, "" if r.final is None else r.final,
                             *[r.errors[i] if i < len(r.errors) else "" for i in range(max_k)],
                             "" if r.sw2 is None else r.sw2, r.error or "", r.mlflow_run_id or ""])
    return path


def markdown_table(rows: list[TrialRow], metric: str) -> str:
    """Columns: the swept keys, K, the error after steps 1, 2, 5, each K the trials use and past it (2K and the
    last evaluated), and for generative families the samples' sliced W2 after step K (what ranks them then)."""
    keys = _keys(rows, but=("task.steps",))  # it is the K column
    columns = _columns(rows)
    samples = any(r.sw2 is not None for r in rows)
    head = ["trial", "status", *[k.rsplit(".", 1)[-1] for k in keys], "K", *[f"step {s}" for s in columns],
            *(["sliced W2 at K"] if samples else [])]
    lines = [f"{metric} on held-out episodes after each refinement step (finished trials: their evaluation; "
             "the others: the last held-out monitor)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ordered(rows):
        cells = [r.trial, r.status, *[_fmt(r.params.get(k, "")) for k in keys], str(r.steps)]
        cells += [format_error(r.errors[s - 1]) if s <= len(r.errors) else "" for s in columns]
        cells += ["" if r.sw2 is None else f"{r.sw2:.3g}"] if samples else []
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if r.error]
    if failed:
        lines += ["", *[f"- {r.trial} failed: {r.error}" for r in failed]]
    seeds = seed_table(rows, metric)
    return "\n".join(lines) + (f"\n\n{seeds}" if seeds else "")


def seed_table(rows: list[TrialRow], metric: str, seed_key: str = "train.seed") -> str:
    """Where the sweep varies the seed: one line per setting of everything else, mean +- standard deviation
    over its finished seeds of the error after each step ('' when the seed is not swept)."""
    finished = [r for r in rows if r.status == "finished" and r.final is not None and seed_key in r.params]
    if len({r.params[seed_key] for r in finished}) < 2:
        return ""
    groups: dict[tuple, list[TrialRow]] = defaultdict(list)
    for r in finished:
        groups[(r.steps, *((k, _fmt(v)) for k, v in r.params.items() if k != seed_key))].append(r)
    keys = _keys(finished, but=("task.steps", seed_key))
    columns = _columns(finished)
    head = [*[k.rsplit(".", 1)[-1] for k in keys], "K", "seeds", *[f"step {s}" for s in columns]]
    lines = [f"{metric}, mean +- standard deviation over seeds ({seed_key}; finished trials only)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group in sorted(groups.values(), key=lambda g: sum(r.final for r in g) / len(g)):
        cells = [_fmt(group[0].params.get(k, "")) for k in keys] + [str(group[0].steps), str(len(group))]
        for s in columns:
            values = [r.errors[s - 1] for r in group if s <= len(r.errors)]
            if not values:  # a step past this group's K
                cells.append("")
                continue
            mean = sum(values) / len(values)
            sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
            cells.append(f"{format_error(mean)} +- {format_error(sd)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(rows: list[TrialRow], out_dir: Path, metric: str) -> list[Path]:
    """error_vs_step.png (a line per trial); error_vs_k.png when K is swept; signals.png when the regime or
    the signal is (grouped bars of the error after step K)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    scored = [r for r in ordered(rows) if r.errors]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for r in scored:
        ax.plot(range(1, len(r.errors) + 1), r.errors, marker="o", ms=3, ls="-" if r.status == "finished" else ":",
                label=f"{r.trial} {short_params(r.params)}" + ("" if r.status == "finished" else f" ({r.status})"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(yscale="log", xlabel="refinement step (mini-batches read)", ylabel=metric,
           title="held-out query error after each refinement step, one line per trial")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, loc="best")
    paths.append(_save(fig, out_dir / "error_vs_step.png"))

    finals = [r for r in scored if r.final is not None]
    if len({r.steps for r in finals}) > 1:
        groups: dict[str, list[TrialRow]] = defaultdict(list)
        for r in finals:
            groups[short_params({k: v for k, v in r.params.items() if k != "task.steps"}) or "K only"].append(r)
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        for label, group in groups.items():
            group.sort(key=lambda r: r.steps)
            ax.plot([r.steps for r in group], [r.final for r in group], marker="o", label=label)
        ax.set(yscale="log", xlabel="K (refinement steps)", ylabel=f"{metric} after step K",
               title="final error vs K")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir / "error_vs_k.png"))

    if len({r.regime for r in finals}) > 1:
        kinds, signals = ["parametric", "explicit", "implicit"], ["obs", "grad", "obs+grad"]
        cell: dict[tuple[str, str], list[float]] = defaultdict(list)
        for r in finals:
            cell[r.regime].append(r.final)
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        width = 0.8 / len(signals)
        for j, signal in enumerate(signals):
            xs = [i + (j - 1) * width for i, kind in enumerate(kinds) if (kind, signal) in cell]
            ys = [sum(cell[(kind, signal)]) / len(cell[(kind, signal)]) for kind in kinds if (kind, signal) in cell]
            if not xs:
                continue
            bars = ax.bar(xs, ys, width, label=signal, color=f"C{j}")
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set(yscale="log", ylabel=f"{metric} after step K", title="signal mix by regime (mean over trials)")
        ax.legend(title="signal")
        paths.append(_save(fig, out_dir / "signals.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
