"""The main job: meta-train a refiner, evaluate it against baselines, log everything to MLflow.

    python -m iai_dist.train [--preset NAME] [--config FILE] [--set KEY=VALUE ...]

Re-running with the same `tracking.run_name` resumes that run from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from iai_dist.config import ConfigError, ExperimentConfig, load_config, preset_names, to_yaml
from iai_dist.evaluate import evaluate, format_table, report_steps
from iai_dist.learner import StepStats
from iai_dist.tasks import build_family
from iai_dist.tracking import Tracker, plot_errors
from iai_dist.training import CheckpointError, Trainer, TrainingDiverged, check_resumable, train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m iai_dist.train", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help=f"a shipped preset: {', '.join(preset_names())} (default: default)")
    parser.add_argument("--config", type=Path, help="a YAML file of config sections (on top of --preset if given)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, repeatable: --set train.lr=3e-4 --set task.dim=8")
    return parser.parse_args(argv)


def progress_printer(label: str):
    start = time.perf_counter()

    def on_log(trainer: Trainer, stats: StepStats, rate: float) -> None:
        k = len(stats.step_errors)
        cols = report_steps(k, k)
        errs = " ".join(f"@{s}:{stats.step_errors[s - 1]:.3g}%" for s in cols)
        tasks = trainer.cfg.train.tasks_per_batch
        print(
            f"[{label}] step {trainer.step:>6}/{trainer.cfg.train.max_steps} | {rate:6.2f} it/s "
            f"{rate * tasks:7.0f} episodes/s | loss {stats.loss:8.4f} | query error {errs} | "
            f"lr {trainer.scheduler.get_last_lr()[0]:.2e} | skipped {trainer.skipped} | "
            f"{time.perf_counter() - start:6.0f}s",
            flush=True,
        )

    return on_log


def one_step_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The one-step (K=1) amortized model: reads all K*B context points at once, same learner steps."""
    return cfg.with_overrides({"task.steps": 1, "task.batch_size": cfg.task.steps * cfg.task.batch_size})


def run(cfg: ExperimentConfig, run_dir: Path, tracker: Tracker) -> dict:
    def logged(label: str, prefix: str):
        printer = progress_printer(label)

        def on_log(trainer: Trainer, stats: StepStats, rate: float) -> None:
            printer(trainer, stats, rate)
            metrics = {f"{prefix}loss": stats.loss, f"{prefix}steps_per_s": rate,
                       f"{prefix}episodes_per_s": rate * trainer.cfg.train.tasks_per_batch,
                       f"{prefix}lr": trainer.scheduler.get_last_lr()[0], f"{prefix}skipped": trainer.skipped}
            metrics.update({f"{prefix}query_error/step_{i + 1}": e for i, e in enumerate(stats.step_errors)})
            tracker.log_metrics(metrics, trainer.step)

        return on_log

    checkpoint = run_dir / "checkpoint.pt"
    trainer = train(cfg, checkpoint, on_log=logged("refiner", "train/"))
    one_step = None
    if cfg.eval.one_step:
        one_dir = run_dir / "one_step"
        one_dir.mkdir(exist_ok=True)
        one_step = train(one_step_config(cfg), one_dir / "checkpoint.pt", on_log=logged("one-step", "one_step/")).model
    print(f"evaluating on {cfg.eval.episodes} held-out episodes, {cfg.eval.horizon}x{cfg.task.steps} steps ...", flush=True)
    summary = evaluate(trainer.model, cfg, one_step, trainer.device)
    summary["train"] = {"steps": trainer.step, "skipped": trainer.skipped, "episodes": trainer.cursor}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot = plot_errors(summary, run_dir / "error_vs_step.png")
    tracker.log_summary(summary)
    for path in (run_dir / "config.yaml", run_dir / "summary.json", plot, checkpoint):
        tracker.log_artifact(path)
    return summary


def prepare_run_dir(cfg: ExperimentConfig, preset: str | None) -> Path:
    """runs/<run_name>; an existing run of that name must have the same config (it is resumed)."""
    runs_dir = Path(cfg.tracking.runs_dir).resolve()
    name = cfg.tracking.run_name or f"{preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = runs_dir / name
    if (run_dir / "checkpoint.pt").exists():
        check_resumable(run_dir / "checkpoint.pt", cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.preset, args.config, args.overrides)
        build_family(cfg.task)  # missing or broken image data stops here, before any work (and is loaded once)
        run_dir = prepare_run_dir(cfg, args.preset or (None if args.config else "default"))
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tracker = Tracker(cfg, run_dir, run_dir.parent)
    print(f"run {run_dir.name}: {cfg.task.family}, {cfg.regime.kind} regime, signal {cfg.regime.signal}, "
          f"K={cfg.task.steps}, B={cfg.task.batch_size}; directory {run_dir}", flush=True)
    try:
        summary = run(cfg, run_dir, tracker)
    except TrainingDiverged as exc:
        tracker.finish("FAILED")
        print(f"error: {exc}; the last good checkpoint is in {run_dir}", file=sys.stderr)
        return 1
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    print()
    print(format_table(summary))
    print()
    print(f"run directory: {run_dir}")
    print(f"checkpoint:    {run_dir / 'checkpoint.pt'}")
    print(f"summary:       {run_dir / 'summary.json'}")
    if tracker.enabled:
        print(f"MLflow run {tracker.run_id}; browse with: mlflow ui --backend-store-uri {tracker.uri} --host 127.0.0.1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
