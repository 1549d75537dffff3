"""Sweep step counts, batch sizes, signal mixes, learning rates: a Ray Tune sweep of training jobs.

    python -m iai_dist.tune --space tune_spaces/NAME.yaml [--preset NAME] [--set KEY=VALUE ...]
                            [--name NAME] [--resume] [--max-concurrent N]

Every trial is a whole `python -m iai_dist.train` job on the Ray service (learner + episode workers, then
the evaluation), logged as a child run of the sweep's MLflow run. The sweep directory runs/<name> holds
Tune's state (tune/), every trial's run (trials/<id>) and the summary (summary.csv, summary.md, plots),
which the parent run also carries, with the best trial's checkpoint. `--resume` continues an interrupted
sweep.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from iai_dist.config import ConfigError, ExperimentConfig, flatten
from iai_dist.evaluate import metric_name
from iai_dist.search_space import SearchSpace, load_space
from iai_dist.sweep_report import best_trial, markdown_table, plot_sweep, write_csv
from iai_dist.tasks import build_family
from iai_dist.tracking import Tracker, tracking_uri

STATE_FILE = "sweep.json"  # the space and base config a sweep was started with; --resume checks them


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m iai_dist.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, required=True, help="a search-space YAML file (tune_spaces/*.yaml)")
    parser.add_argument("--preset", help="the base experiment (default: the space file's preset, else default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override of the base config for every trial, repeatable")
    parser.add_argument("--name", help="the sweep's name and directory under tracking.runs_dir "
                                       "(default: <space>-<date>-<time>; with --resume: the newest sweep of --space)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep: unfinished and "
                        "failed trials resume from their last checkpoints, finished ones are kept")
    parser.add_argument("--max-concurrent", type=int, metavar="N",
                        help="at most N trials at once (default: as many as the cluster can scale to)")
    parser.add_argument("--register", metavar="NAME", help="register the best trial's refiner (its MLflow model) "
                        "in the MLflow model registry under NAME")
    parser.add_argument("--trial-retries", type=int, default=2, metavar="N",
                        help="a failed trial (a lost node, a crashed trial process) is started again up to N times, "
                             "resuming from its own last checkpoint (default: 2)")
    return parser.parse_args(argv)


def sweep_state(space_file: Path, space: SearchSpace, base: ExperimentConfig) -> dict:
    return {"space_file": space_file.name, "space": space.model_dump(mode="json"), "base": base.model_dump(mode="json")}


def prepare_sweep_dir(args: argparse.Namespace, space: SearchSpace, base: ExperimentConfig) -> Path:
    """runs/<name>, new or (with --resume) the interrupted sweep of the same space and config."""
    runs_dir = Path(base.tracking.runs_dir).resolve()
    state = sweep_state(args.space, space, base)
    if not args.resume:
        name = args.name or f"{args.space.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        sweep_dir = runs_dir / name
        if sweep_dir.exists():
            raise ConfigError(f"sweep {name!r} already exists in {runs_dir}: add --resume to continue it, "
                              "or pick another --name")
        sweep_dir.mkdir(parents=True)
        (sweep_dir / STATE_FILE).write_text(json.dumps(state, indent=1))
        return sweep_dir
    if args.name:
        sweep_dir = runs_dir / args.name
    else:
        mine = [p.parent for p in runs_dir.glob(f"*/{STATE_FILE}")
                if json.loads(p.read_text()).get("space_file") == args.space.name]
        if not mine:
            raise ConfigError(f"--resume: no sweep of {args.space.name} in {runs_dir}; give its --name")
        sweep_dir = max(mine, key=lambda p: (p / STATE_FILE).stat().st_mtime)
    if not (sweep_dir / STATE_FILE).is_file():
        raise ConfigError(f"--resume: {sweep_dir} is not a sweep directory (no {STATE_FILE})")
    from ray import tune

    from iai_dist.service.sweep import TUNE_DIR

    if not tune.Tuner.can_restore(str(sweep_dir / TUNE_DIR)):
        raise ConfigError(f"--resume: {sweep_dir} has no Tune state to resume (the sweep never started a trial)")
    started = json.loads((sweep_dir / STATE_FILE).read_text())
    for part, what in (("space", "search space"), ("base", "base config")):
        old, new = flatten(started[part]), flatten(state[part])
        diff = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
        if diff:
            raise ConfigError(f"--resume: sweep {sweep_dir.name} was started with another {what} ({diff[0]}: "
                              f"{old.get(diff[0])!r} then, {new.get(diff[0])!r} now); resume it with the same "
                              "file, preset and --set, or start a new sweep")
    return sweep_dir


def publish(rows, sweep_dir: Path, parent: Tracker, metric: str) -> str:
    """Summary CSV + markdown + plots into the sweep directory and the parent run; the best trial's
    checkpoint too; the children that did not finish get their status. Returns the markdown."""
    table = markdown_table(rows, metric)
    (sweep_dir / "summary.md").write_text(table + "\n")
    for path in (write_csv(rows, sweep_dir / "summary.csv"), sweep_dir / "summary.md",
                 *plot_sweep(rows, sweep_dir, metric)):
        parent.log_artifact(path)
    best = best_trial(rows)
    if best is not None:
        parent.log_artifact(best.run_dir / "checkpoint.pt", "best_trial")
        parent.log_artifact(best.run_dir / "config.yaml", "best_trial")
        parent.log_metrics({"sweep/best_error_at_K": best.final}
                           | ({} if best.sw2 is None else {"sweep/best_sw2_at_K": best.sw2}), 0)
    counts = {s: sum(r.status == s for r in rows) for s in ("finished", "stopped early", "unfinished", "failed")}
    parent.log_metrics({f"sweep/trials_{s.replace(' ', '_')}": n for s, n in counts.items()}, 0)
    parent.set_statuses({r.mlflow_run_id: "FAILED" if r.status == "failed" else "KILLED"
                         for r in rows if r.mlflow_run_id and r.status != "finished"})
    return table


def main(argv: list[str] | None = None, on_trial=None) -> int:
    """`on_trial(cfg)` runs inside every trial before it trains (fault injection in tests)."""
    args = parse_args(argv)
    try:
        space, base = load_space(args.space, args.preset, args.overrides)
        if args.max_concurrent is not None and args.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent: expected a positive number of trials (got {args.max_concurrent})")
        if args.trial_retries < 0:
            raise ConfigError(f"--trial-retries: expected 0 or more (got {args.trial_retries})")
        if base.tracking.register:
            raise ConfigError("tracking.register: every trial would register its model; use --register NAME to "
                              "register the best trial's")
        if args.register and not base.tracking.enabled:
            raise ConfigError("--register: needs MLflow tracking (tracking.enabled is false)")
        family = build_family(base.task)  # missing image data stops here, before any trial
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from iai_dist.service.runtime import check_shared_paths, ray_session
    from iai_dist.service.sweep import run_sweep, trials_at_once

    with ray_session(base):
        try:  # what needs the cluster to check: paths other machines cannot reach, a trial larger than it
            check_shared_paths(base, base.tracking.runs_dir, tracking_uri(Path(base.tracking.runs_dir)))
            at_once = trials_at_once(base, space, args.max_concurrent)
            sweep_dir = prepare_sweep_dir(args, space, base)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        parent = Tracker(base, sweep_dir, sweep_dir.parent, run_name=sweep_dir.name)
        if not args.resume:
            parent.log_params({f"sweep.{key}": f"{d.kind} {list(d.values)}" for key, d in space.params.items()})
            parent.log_artifact(args.space)
        try:
            rows = run_sweep(space, base, sweep_dir, parent, args.resume, at_once, on_trial, args.trial_retries)
            table = publish(rows, sweep_dir, parent, metric_name(family.kind))
        except BaseException:
            parent.finish("FAILED")
            raise
    parent.finish()
    print()
    print(table)
    print()
    best = best_trial(rows)
    if best is not None:
        samples = "" if best.sw2 is None else f", samples' sliced W2 {best.sw2:.3g}"
        print(f"best trial:  {best.trial} ({best.final:.3g}% after step {best.steps}{samples}); checkpoint "
              f"{best.run_dir / 'checkpoint.pt'}")
        if args.register:
            version = parent.register_model(best.mlflow_run_id, args.register)
            print(f"registered:  models:/{args.register}/{version} (the best trial's refiner)")
    print(f"sweep directory: {sweep_dir} (summary.csv, summary.md, plots; trials/<id> per trial)")
    if parent.enabled:
        print(f"MLflow parent run {parent.run_id}; browse with: make ui")
    failed = [r.trial for r in rows if r.status == "failed"]
    unfinished = [r.trial for r in rows if r.status == "unfinished"]
    if failed or unfinished:
        again = (f"python -m iai_dist.tune --space {args.space} --name {sweep_dir.name} --resume "
                 "(and the same --preset, --set)")
        print(f"{len(failed)} trial(s) failed ({', '.join(failed) or '-'}), {len(unfinished)} unfinished "
              f"({', '.join(unfinished) or '-'}); continue them from their last checkpoints with: {again}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
