"""MLflow: one run per training job, params from the resolved config, per-step metrics, the summary, plots."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from iai_dist.config import ExperimentConfig, flatten


def tracking_uri(runs_dir: Path) -> str:
    """MLFLOW_TRACKING_URI when set, else an absolute SQLite store under the runs directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(runs_dir / 'mlflow.db').resolve()}"


def run_tags(cfg: ExperimentConfig, preset: str | None) -> dict[str, str]:
    """What a reviewer filters runs by in the MLflow UI."""
    d = cfg.distributed
    tags = {"task.family": cfg.task.family, "regime.kind": cfg.regime.kind, "regime.signal": cfg.regime.signal,
            "K": str(cfg.task.steps), "B": str(cfg.task.batch_size),
            "cluster": f"{d.num_workers} learners + {d.episode_workers} episode workers" if d.num_workers
            else "in process"}
    if preset:
        tags["preset"] = preset
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    return tags


def git_commit() -> str | None:
    """The commit of the code that runs (with `+dirty` for uncommitted changes), when it is a git checkout."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty else "")


def download_checkpoint(uri: str, runs_dir: Path = Path("runs")) -> Path:
    """The checkpoint behind `runs:/RUN_ID` (the `checkpoint.pt` every training run logs) or `runs:/RUN_ID/PATH`,
    from the store `tracking_uri(runs_dir)` names, downloaded to a temporary directory."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from iai_dist.checkpoint import CheckpointError

    run_id, _, path = uri[len("runs:/"):].strip("/").partition("/")
    if not run_id:
        raise CheckpointError(f"{uri}: expected runs:/RUN_ID or runs:/RUN_ID/PATH")
    store = tracking_uri(runs_dir)
    try:
        return Path(download_artifacts(artifact_uri=f"runs:/{run_id}/{path or 'checkpoint.pt'}", tracking_uri=store))
    except (MlflowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{uri}: could not be downloaded from MLflow store {store}: {first}") from None


class RunLogger:
    """Logs metrics into an existing MLflow run from any process: the driver, or rank 0 of the Ray learner.

    Picklable (it holds only the URI and run id), so the driver hands it to the Train workers; a no-op when
    the run id is None (tracking disabled).
    """

    def __init__(self, uri: str | None = None, run_id: str | None = None):
        self.uri, self.run_id = uri, run_id
        self._client = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        if self._client is None:
            self._client = MlflowClient(self.uri)
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):  # the store's limit per batch
            self._client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    @contextlib.contextmanager
    def system_metrics(self, node_id: str):
        """MLflow's system metrics (CPU, memory, GPU) of this machine into the run as `system/<node_id>/...`
        while the context is open (every 10 s, or MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL)."""
        if self.run_id is None:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # not 4 INFO lines per learner
        monitor = SystemMetricsMonitor(self.run_id, node_id=node_id, tracking_uri=self.uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "run_id": self.run_id, "_client": None}


class Tracker:
    """A thin wrapper that is a no-op when tracking is disabled, so the training loop never branches on it.

    The run is created (or resumed, from run_dir/mlflow_run_id) here on the driver, with MLflow's system
    metrics (CPU, memory, GPU) sampled in the background for as long as it is open.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, runs_dir: Path, run_name: str | None = None,
                 parent_run_id: str | None = None, preset: str | None = None):
        self.enabled = cfg.tracking.enabled
        self.run_id: str | None = None
        self.uri = tracking_uri(runs_dir)
        self.logger = RunLogger()
        if not self.enabled:
            return
        import mlflow

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # not 4 INFO lines per run
        self._mlflow = mlflow
        own_store = not os.environ.get("MLFLOW_TRACKING_URI")  # read before set_tracking_uri exports it
        mlflow.set_tracking_uri(self.uri)
        if own_store and mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
            # artifacts beside the store, not in ./mlruns of whatever directory the job started in
            artifacts = (runs_dir / "mlartifacts").resolve().as_uri()
            mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
        mlflow.set_experiment(cfg.tracking.experiment)
        id_file = run_dir / "mlflow_run_id"
        resume = id_file.read_text().strip() if id_file.exists() else None
        # a sweep's trials are nested runs of the sweep's parent run (parent_run_id)
        run = mlflow.start_run(run_id=resume, run_name=None if resume else run_name or run_dir.name,
                               parent_run_id=parent_run_id, log_system_metrics=True)
        self.run_id = run.info.run_id
        self.logger = RunLogger(self.uri, self.run_id)
        id_file.write_text(self.run_id)
        if not resume:
            mlflow.log_params(flatten(cfg))
            mlflow.set_tags(run_tags(cfg, preset))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logger.log_metrics(metrics, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._mlflow.log_artifact(str(path), artifact_path)

    def log_model(self, checkpoint: Path, cfg: ExperimentConfig) -> None:
        """The refiner as this run's MLflow pyfunc model (registered as cfg.tracking.register, if set). The model
        predicts targets of query rows, so generative families (whose refiners generate samples) log none."""
        from iai_dist.tasks import FAMILIES

        if self.enabled and FAMILIES[cfg.task.family].kind != "generative":
            from iai_dist.mlflow_model import log_refiner

            log_refiner(checkpoint, cfg, cfg.tracking.register)

    def register_model(self, run_id: str, name: str) -> str:
        """Register the refiner model logged by run `run_id` (a sweep's best trial) as a new version of `name`."""
        from iai_dist.mlflow_model import MODEL_NAME

        logged = self._mlflow.search_logged_models(filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'",
                                                   output_format="list")
        if not logged:
            raise ValueError(f"run {run_id} logged no {MODEL_NAME!r} model to register")
        return self._mlflow.register_model(logged[0].model_uri, name).version

    def log_params(self, params: dict) -> None:
        if self.enabled:
            self._mlflow.log_params(params)

    def set_statuses(self, statuses: dict[str, str]) -> None:
        """Final status of other runs (a sweep's trials): a trial Tune stops or cuts off either never ends
        its own run or ends it FAILED, when the stop interrupts it; KILLED is what happened."""
        if not self.enabled:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        for run_id, status in statuses.items():
            if client.get_run(run_id).info.status != status:
                client.set_terminated(run_id, status)

    def log_summary(self, summary: dict) -> None:
        """Final errors as metrics: `eval/<method>/error` per refinement step (MLflow's step = the refinement
        step, so one chart shows error vs step and runs compare on it), `eval/<method>` for the at-once ones;
        generative families also `eval/<sw2|mmd|nll>/<method>` per step."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"eval/{name}", float(err), now, 0) for name, err in summary["at_once"].items()]
        for name, errs in summary["per_step"].items():
            metrics += [Metric(f"eval/{name}/error", float(e), now, i) for i, e in enumerate(errs)]
        for split, scores in summary.get("generative", {}).get("sets", {}).items():
            where = "eval/" if split == "test" else "eval/training_letters/"
            for metric, methods in scores.items():  # eval/sw2/refiner at each refinement step; at once: step 0
                metrics += [Metric(f"{where}{metric}/{name}", value, now, 0 if key == "at_once" else int(key))
                            for name, by_step in methods.items() for key, value in by_step.items()]
        self._mlflow.tracking.MlflowClient(self.uri).log_batch(self.run_id, metrics=metrics)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self._mlflow.active_run() is not None:
            self._mlflow.end_run(status=status)


def plot_errors(summary: dict, path: Path) -> Path:
    """Error vs refinement step (log scale) for the refiner and the baselines; at-once baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    steps = summary["steps"][1:]
    for name, errs in summary["per_step"].items():
        ax.plot(steps, errs[1:], marker="o", ms=3, label=name, lw=2.2 if name == "refiner" else 1.2)
    for name, err in summary["at_once"].items():
        ax.axhline(err, ls="--", lw=1, label=f"{name} (all K·B points)", color="grey" if name == "full_fit" else "black")
    ax.axvline(summary["K"], color="k", lw=0.5, alpha=0.4)
    ax.set_yscale("log")
    ax.set_xlabel("refinement step (mini-batches read); K = %d" % summary["K"])
    ax.set_ylabel(summary["metric"])
    ax.set_title(f"{summary['task']['family']} · {summary['regime']['kind']} · {summary['regime']['signal']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_samples(pictures: dict, summary: dict, path: Path) -> Path:
    """Generated samples beside the truth: a row per task, columns truth | refiner after each shown step |
    the baselines at step K (pictures: method -> {step or 'at_once': [tasks, n, 2] samples}, 2-D only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = summary["K"]
    shown = [s for s in (1, 5, k) if s in pictures["refiner"]]
    columns = [("truth", "at_once", "truth")] + [("refiner", s, f"refiner, step {s}") for s in dict.fromkeys(shown)]
    columns += [(m, k, f"{m}, step {k}") for m in ("adam", "em") if k in pictures.get(m, {})]
    columns += [("one_step", "at_once", f"one-step, all {k} at once")] if "one_step" in pictures else []
    rows = pictures["truth"]["at_once"].shape[0]
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.1 * len(columns), 2.1 * rows), dpi=110, squeeze=False)
    truth = pictures["truth"]["at_once"]
    for r in range(rows):
        lo, hi = truth[r].min(0).values - 1.0, truth[r].max(0).values + 1.0
        for c, (method, key, title) in enumerate(columns):
            ax = axes[r, c]
            pts = pictures[method][key][r]
            ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.6, color="black" if method == "truth" else "C0", lw=0)
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(lo[1], hi[1])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
            if r == 0:
                ax.set_title(title, fontsize=8)
    fig.suptitle(f"{summary['task']['family']} · {summary['regime']['kind']} · {summary['regime']['signal']}: "
                 "generated samples (held-out tasks)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
