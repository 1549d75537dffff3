"""The main job: meta-train a refiner, evaluate it against baselines, log everything to MLflow.

    python -m iai_dist.train [--preset NAME] [--config FILE] [--set KEY=VALUE ...]

Re-running with the same `tracking.run_name` resumes that run from its checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from iai_dist import checkpoint
from iai_dist.checkpoint import CheckpointError
from iai_dist.config import ConfigError, ExperimentConfig, load_config, preset_names, to_yaml
from iai_dist.evaluate import evaluate_trained, format_table, one_step_config
from iai_dist.learner import ServiceError, TrainingDiverged, train_in_process
from iai_dist.tasks import build_family
from iai_dist.tracking import Tracker, plot_errors, plot_samples, tracking_uri


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m iai_dist.train", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help=f"a shipped preset: {', '.join(preset_names())} (default: default)")
    parser.add_argument("--config", type=Path, help="a YAML file of config sections (on top of --preset if given)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, repeatable: --set train.lr=3e-4 --set task.dim=8")
    return parser.parse_args(argv)


def fit_in_process(cfg: ExperimentConfig, out_dir: Path, tracker: Tracker, label: str, prefix: str,
                   callbacks: Sequence = ()):
    if callbacks:
        raise ValueError("Ray Train callbacks need the Ray service (distributed.num_workers > 0)")
    _, totals = train_in_process(cfg, out_dir / "checkpoint.pt", resume_from=checkpoint.newest(out_dir),
                                 log=tracker.log_metrics, label=label, prefix=prefix)
    return out_dir / "checkpoint.pt", totals


def fit_on_ray(cfg: ExperimentConfig, out_dir: Path, tracker: Tracker, label: str, prefix: str,
               callbacks: Sequence = ()):
    from iai_dist.service.fit import fit  # Ray stays out of the in-process path

    result = fit(cfg, out_dir, tracker.logger, label, prefix, callbacks=callbacks)
    restarted = [w["index"] for w in result.workers if w["restarted"]]
    nodes = set(result.service.get("learner_nodes", [])) | {w["node"] for w in result.workers}
    return result.checkpoint, {**result.service, "restarted_episode_workers": restarted, "nodes": len(nodes)}


def run(cfg: ExperimentConfig, run_dir: Path, tracker: Tracker, callbacks: Sequence = ()) -> dict:
    """Train the refiner (and the one-step model), evaluate, log; `callbacks` (Ray Train's) see the
    refiner's training only: a sweep's trial forwards its reports to Tune with them."""
    on_ray = bool(cfg.distributed.num_workers)
    fit_model = fit_on_ray if on_ray else fit_in_process
    trained, info = fit_model(cfg, run_dir, tracker, "refiner", "train/", callbacks)
    one_step = None
    if cfg.eval.one_step:
        one_dir = run_dir / "one_step"
        one_dir.mkdir(exist_ok=True)
        one_step, _ = fit_model(one_step_config(cfg), one_dir, tracker, "one-step", "one_step/")
    where = " (Ray work with a learner's resources)" if on_ray else ""
    print(f"evaluating on {cfg.eval.episodes} held-out episodes, {cfg.eval.horizon}x{cfg.task.steps} steps{where} ...",
          flush=True)
    states = [None if path is None else checkpoint.read_checkpoint(path)[0]["model"] for path in (trained, one_step)]
    if on_ray:
        from iai_dist.service.evaluation import evaluate_on_cluster

        summary = evaluate_on_cluster(cfg, *states)
    else:
        summary = evaluate_trained(cfg, *states)
    summary["train"] = info
    pictures = summary.get("generative", {}).pop("pictures", {})
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plots = [plot_errors(summary, run_dir / "error_vs_step.png")]
    if "test" in pictures and cfg.task.dim == 2:
        plots.append(plot_samples(pictures["test"], summary, run_dir / "samples.png"))
    tracker.log_summary(summary)
    for path in (run_dir / "config.yaml", run_dir / "summary.json", *plots, run_dir / "checkpoint.pt"):
        tracker.log_artifact(path)
    tracker.log_model(run_dir / "checkpoint.pt", cfg)
    return summary


def service_session(cfg: ExperimentConfig):
    """Ray for the service path (joined or embedded, see service.runtime); nothing for the in-process one."""
    if not cfg.distributed.num_workers:
        return contextlib.nullcontext()
    # The driver imports what it needs from the job's working dir before Ray connects. Two raylets of one machine
    # that share a temp dir (`ray start` twice without --temp-dir) share the unpacked working dir, and each
    # node's runtime-env agent deletes and re-extracts it when the job first runs there: an import from it in
    # that moment fails (seen: "No module named 'iai_dist.service.fit'" in 2 of 6 first jobs on such a cluster)
    import iai_dist.service.evaluation  # noqa: F401  (fit_on_ray and run import from these two later)
    import iai_dist.service.fit  # noqa: F401
    from iai_dist.service.runtime import ray_session

    return ray_session(cfg)


def prepare_run_dir(cfg: ExperimentConfig, preset: str | None) -> Path:
    """runs/<run_name>; an existing run of that name is resumed, so its checkpoints must allow this config."""
    runs_dir = Path(cfg.tracking.runs_dir).resolve()
    name = cfg.tracking.run_name or f"{preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = runs_dir / name
    if run_dir.is_dir():
        for resumed in (run_dir, run_dir / "one_step"):
            newest = checkpoint.newest(resumed) if resumed.is_dir() else None
            if newest is not None:  # the run resumes from it: it must be readable and allow this config
                checkpoint.check_resumable(newest, one_step_config(cfg) if resumed.name == "one_step" else cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = args.preset or (None if args.config else "default")  # what load_config layers the run on
    try:
        cfg = load_config(args.preset, args.config, args.overrides)
        build_family(cfg.task)  # missing or broken image data stops here, before any work (and is loaded once)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with service_session(cfg):  # Ray, joined or embedded (the service path); nothing in process
        try:
            if cfg.distributed.num_workers:
                from iai_dist.service.runtime import check_shared_paths

                check_shared_paths(cfg, cfg.tracking.runs_dir, tracking_uri(Path(cfg.tracking.runs_dir)))
            run_dir = prepare_run_dir(cfg, preset)
        except (ConfigError, CheckpointError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return train_and_report(cfg, run_dir, preset)


def train_and_report(cfg: ExperimentConfig, run_dir: Path, preset: str | None = None) -> int:
    tracker = Tracker(cfg, run_dir, run_dir.parent, preset=preset)
    print(f"run {run_dir.name}: {cfg.task.family}, {cfg.regime.kind} regime, signal {cfg.regime.signal}, "
          f"K={cfg.task.steps}, B={cfg.task.batch_size}; directory {run_dir}", flush=True)
    try:
        summary = run(cfg, run_dir, tracker)
    except (TrainingDiverged, CheckpointError, ServiceError) as exc:
        tracker.finish("FAILED")
        print(f"error: {exc}; the last good checkpoint is in {run_dir}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        tracker.finish("FAILED")
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
