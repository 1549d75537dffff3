"""A Ray Tune sweep whose trials are whole training jobs of the service, nested in one MLflow parent run.

Each trial is `train.run` (the Ray Train learner fed by episode workers, then the evaluation) with the
drawn overrides, in sweep_dir/trials/<trial id>; Ray Train's reports reach Tune through its
TuneReportCallback, which is what ASHA decides on. A trial's directory is its own resumable run, so
`--resume` (Tuner.restore) continues an interrupted trial from its last checkpoint and never re-runs a
finished one. The sweep's trials run as many at once as the cluster has room for: Tune does not see the
learners and episode workers a trial starts, so the driver counts them itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from iai_dist.config import ConfigError, ExperimentConfig, validate
from iai_dist.search_space import Domain, SearchSpace, trial_overrides
from iai_dist.service.feed import error_line
from iai_dist.service.fit import episode_worker_resources, learner_resources
from iai_dist.service.capacity import Capacity, cluster_capacity, fits
from iai_dist.sweep_report import TrialRow, short_params
from iai_dist.tracking import Tracker

# Tune's experiment directory inside the sweep's: Tune stages it and copies it back over storage, so
# files of ours kept there could be overwritten by stale copies
TUNE_DIR = "tune"
ENDED_FILE = "trials_ended.json"  # trial id -> finished | stopped early | failed, as the trials end
TRIALS_DIR = "trials"  # each trial's run directory: trials/<trial id>
TRIAL_CPUS = 1.0  # the trial's own process: it drives the TorchTrainer


@dataclass(frozen=True)
class SweepContext:
    """What every trial gets besides its drawn values (tune.with_parameters puts it in the object store)."""

    base: dict  # the base ExperimentConfig as JSON data
    trials_dir: str
    tracking_uri: str
    parent_run_id: str | None
    on_trial: Callable[[ExperimentConfig], None] | None = None  # called in the trial before training: tests


def trial_name(trial_id: str, params: dict[str, Any]) -> str:
    """The child run's name in MLflow: the trial id and what it varies."""
    return f"{trial_id} {short_params(trial_overrides(params))}".strip()


def run_trial(params: dict[str, Any], sweep: SweepContext) -> None:
    """Tune's function trainable: one training job, resumed from its directory if it has run before."""
    from iai_dist.train import prepare_run_dir, run  # the trial process imports the job, not the driver

    trial_id = tune.get_context().get_trial_id()
    overrides = {**trial_overrides(params), "tracking.runs_dir": sweep.trials_dir, "tracking.run_name": trial_id}
    cfg = validate(sweep.base, "sweep base config").with_overrides(overrides)
    run_dir = prepare_run_dir(cfg, None)
    os.environ["MLFLOW_TRACKING_URI"] = sweep.tracking_uri  # the sweep's store, on whichever node this runs
    tracker = Tracker(cfg, run_dir, run_dir.parent, run_name=trial_name(trial_id, params),
                      parent_run_id=sweep.parent_run_id)
    try:
        if sweep.on_trial is not None:
            sweep.on_trial(cfg)
        summary = run(cfg, run_dir, tracker, callbacks=[TuneReportCallback()])
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    k = cfg.task.steps
    tune.report({"learner_step": cfg.train.max_steps, "heldout_error": summary["per_step"]["refiner"][k],
                 "evaluated": 1})


def trial_resources(cfg: ExperimentConfig) -> tune.PlacementGroupFactory:
    """The trial's placement group: its own process and its episode workers (actors it starts itself).
    Ray Train places the learners in a placement group of its own (so does the evaluation task)."""
    return tune.PlacementGroupFactory(training_bundles(cfg)[:1 + cfg.distributed.episode_workers])


def training_bundles(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """Everything one training of the sweep holds at once: the trial process, its episode workers, its learners."""
    d = cfg.distributed
    return ([{"CPU": TRIAL_CPUS}] + [episode_worker_resources(d)] * d.episode_workers
            + [learner_resources(d)] * d.num_workers)


def trials_at_once(base: ExperimentConfig, space: SearchSpace, cap: int | None, capacity: Capacity | None = None
                   ) -> int:
    """As many trials as the cluster can hold once scaled up (the largest trial where the space varies
    distributed.*), at most the number of trials (or `cap`). A trial larger than the whole cluster can ever
    be is refused before any work."""
    capacity = capacity or cluster_capacity()
    configs = [base] + [base.with_overrides(trial_overrides({key: value}))
                        for key, domain in space.params.items() if key.startswith("distributed")
                        for value in domain.probes()]
    largest = max(configs, key=lambda c: sum(sum(b.values()) for b in training_bundles(c)))
    n = min(fits(capacity, training_bundles(c), space.num_trials()) for c in configs)
    if n == 0:
        raise ConfigError(f"one trial needs {len(training_bundles(largest))} bundles "
                          f"({_bundles(training_bundles(largest))}), more than the cluster can scale to: "
                          f"{capacity.describe()} (read from {capacity.source})")
    return min(n, cap) if cap else n


def _bundles(bundles: list[dict[str, float]]) -> str:
    counts: dict[str, int] = {}
    for b in bundles:
        key = "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(b.items())) + "}"
        counts[key] = counts.get(key, 0) + 1
    return " + ".join(f"{n} x {k}" for k, n in counts.items())


def _tune_domain(domain: Domain):
    if domain.kind == "grid":
        return tune.grid_search(list(domain.values))
    if domain.kind == "choice":
        return tune.choice(list(domain.values))
    lo, hi = domain.values
    return (tune.uniform if domain.kind == "uniform" else tune.loguniform)(float(lo), float(hi))


def _scheduler(space: SearchSpace, base: ExperimentConfig):
    if space.early_stopping is None:
        return None  # FIFO: every trial runs to the end
    max_t = base.train.max_steps
    if "train.max_steps" in space.params:
        max_t = max(int(v) for v in space.params["train.max_steps"].probes())
    es = space.early_stopping
    # stop_last_trials=False: a trial that trained to the end goes on to its evaluation (Tune's default
    # would stop it at max_t, right before that)
    return ASHAScheduler(time_attr="learner_step", metric="heldout_error", mode="min", max_t=max_t,
                         grace_period=min(es.grace_steps, max_t), reduction_factor=es.reduction_factor,
                         stop_last_trials=False)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _trial_name(trial) -> str:
    return trial.trial_id


def read_ended(sweep_dir: Path) -> dict[str, str]:
    """How the trials that ended did (SweepProgress writes it as they end)."""
    path = sweep_dir / ENDED_FILE
    return json.loads(path.read_text()) if path.exists() else {}


class SweepProgress(tune.Callback):
    """One line per trial event on the driver (done, stopped early, running, failed, the best so far), and
    how each trial ended, kept in a file: Tune also marks the trials it cuts off at an interruption as
    terminated, and only these events tell them apart from the ones that ended."""

    def __init__(self, total: int, sweep_dir: Path):
        self.total, self.sweep_dir = total, sweep_dir

    def _end(self, trial, how: str) -> None:
        ended = {**read_ended(self.sweep_dir), trial.trial_id: how}
        (self.sweep_dir / ENDED_FILE).write_text(json.dumps(ended, indent=1))

    def _line(self, trials: list, event: str) -> None:
        ended = read_ended(self.sweep_dir)
        done = sum(1 for t in trials if ended.get(t.trial_id) in ("finished", "stopped early"))
        stopped = sum(1 for t in trials if ended.get(t.trial_id) == "stopped early")
        failed = sum(1 for t in trials if ended.get(t.trial_id) == "failed")
        running = sum(1 for t in trials if t.status == "RUNNING" and t.trial_id not in ended)
        scored = [t for t in trials if "heldout_error" in (t.last_result or {})]
        best = ""
        if scored:
            b = min(scored, key=lambda t: t.last_result["heldout_error"])
            best = (f" | best so far {b.trial_id} {b.last_result['heldout_error']:.3g}% after step K at learner step "
                    f"{b.last_result.get('learner_step', '?')} ({short_params(trial_overrides(b.config))})")
        print(f"[sweep] {event} | {done}/{self.total} done ({stopped} stopped early), {running} running, "
              f"{failed} failed{best}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(trials, f"started {trial.trial_id} ({short_params(trial_overrides(trial.config))})")

    def on_trial_complete(self, iteration, trials, trial, **info):
        how = "finished" if (trial.last_result or {}).get("evaluated") else "stopped early"
        self._end(trial, how)
        self._line(trials, f"{trial.trial_id} {how}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "failed")
        self._line(trials, f"{trial.trial_id} FAILED")


def run_sweep(space: SearchSpace, base: ExperimentConfig, sweep_dir: Path, parent: Tracker, resume: bool,
              at_once: int, on_trial: Callable[[ExperimentConfig], None] | None = None,
              trial_retries: int = 2) -> list[TrialRow]:
    """Run (or continue) the sweep on the connected Ray cluster, `at_once` trials at a time (trials_at_once);
    one row per trial, finished or not. A trial that fails is started again up to `trial_retries` times (a
    lost node), resuming from its own checkpoint."""
    context = SweepContext(base.model_dump(mode="json"), str(sweep_dir / TRIALS_DIR), parent.uri, parent.run_id,
                           on_trial)
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=context),
                                    lambda params: trial_resources(base.with_overrides(trial_overrides(params))))
    capacity = cluster_capacity()
    print(f"[sweep] {sweep_dir.name}: {space.num_trials()} trial(s), {at_once} at a time (each "
          f"{_bundles(training_bundles(base))}; the cluster can scale to {capacity.describe()}, from "
          f"{capacity.source}); early stopping {'ASHA' if space.early_stopping else 'off'}", flush=True)
    if resume:
        tuner = tune.Tuner.restore(str(sweep_dir / TUNE_DIR), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={key: _tune_domain(domain) for key, domain in space.params.items()},
            tune_config=tune.TuneConfig(
                scheduler=_scheduler(space, base), num_samples=space.num_samples, max_concurrent_trials=at_once,
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR, storage_path=str(sweep_dir), verbose=0,
                callbacks=[SweepProgress(space.num_trials(), sweep_dir)],
                # a failed trial is retried from its own checkpoint, then reported; the rest go on
                failure_config=tune.FailureConfig(max_failures=trial_retries),
            ),
        )
    results = tuner.fit()
    ended = read_ended(sweep_dir)
    return [_row(result, ended, sweep_dir, base) for result in results]


def _row(result, ended: dict[str, str], sweep_dir: Path, base: ExperimentConfig) -> TrialRow:
    """A trial's errors after each refinement step: its evaluation (summary.json) when it finished, else the
    held-out monitor of its last report (ASHA stopped it, it failed, or the sweep was interrupted)."""
    trial_id = Path(result.path).name.removeprefix("trial_")
    overrides = trial_overrides(result.config)
    cfg = base.with_overrides(overrides)
    metrics = result.metrics or {}
    run_dir = sweep_dir / TRIALS_DIR / trial_id
    summary_file = run_dir / "summary.json"
    status = ended.get(trial_id, "unfinished")  # unfinished: the sweep was interrupted; --resume continues it
    sw2 = None
    if status == "finished" and summary_file.exists():
        summary = json.loads(summary_file.read_text())
        errors = summary["per_step"]["refiner"][1:]  # steps 1..eval.horizon x K
        source = "evaluation"
        if "generative" in summary:
            sw2 = summary["generative"]["sets"]["test"]["sw2"]["refiner"].get(str(cfg.task.steps))
    else:
        errors = []  # steps 1..train.horizon x K
        while f"train/heldout_error/step_{len(errors) + 1}" in metrics:
            errors.append(metrics[f"train/heldout_error/step_{len(errors) + 1}"])
        source = "held-out monitor" if errors else ""
    run_id_file = run_dir / "mlflow_run_id"
    return TrialRow(
        trial=trial_id, status=status, params=overrides, steps=cfg.task.steps,
        regime=(cfg.regime.kind, cfg.regime.signal),
        learner_steps=int(metrics.get("learner_step", 0)), errors=[float(e) for e in errors], source=source,
        error=None if result.error is None or status != "failed" else error_line(result.error),
        run_dir=run_dir, mlflow_run_id=run_id_file.read_text().strip() if run_id_file.exists() else None, sw2=sw2,
    )

