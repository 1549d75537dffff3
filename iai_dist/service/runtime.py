"""Where the job's Ray comes from: the cluster it was submitted to, or an embedded one sized to the machine;
and what a job on a cluster must not do (write where other machines cannot read)."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import ray

from iai_dist.config import ConfigError, ExperimentConfig
from iai_dist.service.capacity import Capacity, cluster_capacity
from iai_dist.tasks import FAMILIES


def cpus_needed(cfg: ExperimentConfig) -> int:
    """Logical CPUs the service reserves: learners, episode workers and one for the driver's own work."""
    d = cfg.distributed
    return math.ceil(d.num_workers * d.learner_cpus + d.episode_workers * d.episode_worker_cpus) + 1


@contextmanager
def ray_session(cfg: ExperimentConfig) -> Iterator[None]:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start a local Ray just for this job
    and shut it down afterwards, leaving no processes behind. An already connected Ray (tests) is reused."""
    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS"):
        leave_job_package()
        ray.init(log_to_driver=True)
    else:
        # Ray's own default applies: token authentication, with a token it makes in ~/.ray/auth_token. The
        # dashboard listens on 127.0.0.1, but Ray's gRPC ports listen on every interface, and whoever reaches
        # them can run code. Logical CPUs may exceed the cores: a 2-core laptop still fits 1 learner + 1
        # episode worker. The dashboard stays on: Ray Train's placement-group cleaner uses its state API.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus_needed(cfg)), log_to_driver=True,
                 dashboard_host="127.0.0.1")
        if cfg.distributed.use_gpu and not ray.cluster_resources().get("GPU"):
            ray.shutdown()
            raise ConfigError("distributed.use_gpu: this machine has no GPU that Ray can see; set it to false")
    try:
        yield
    finally:
        ray.shutdown()


def leave_job_package() -> None:
    """A `ray job submit --working-dir` driver starts inside the unpacked package (runtime_resources/
    working_dir_files/_ray_pkg_<hash>). Ray may delete and unpack that directory again while the driver runs
    (seen with two raylets on one machine: the second node's runtime-env agent re-creates the package when
    the driver connects), after which the driver's cwd no longer exists and os.getcwd() fails. Paths are
    absolute by then; the driver moves out to a directory that stays."""
    cwd = Path(os.getcwd())
    if "working_dir_files" in cwd.parts:
        os.chdir(Path.home() if Path.home().is_dir() else "/")


def check_shared_paths(cfg: ExperimentConfig, runs_dir: str, tracking_uri: str | None,
                       capacity: Capacity | None = None) -> None:
    """On a cluster that spans machines (`capacity`, default the connected cluster's), refuse before any work
    what would land where other nodes cannot read or write: a relative runs directory or data path (episode
    workers on every node read the family's files), an MLflow store in a local file."""
    capacity = cluster_capacity() if capacity is None else capacity
    if not capacity.spans_machines:
        return
    where = f"this cluster spans machines ({capacity.describe()}, from {capacity.source})"
    if not Path(runs_dir).expanduser().is_absolute():
        raise ConfigError(f"tracking.runs_dir: {runs_dir!r} is relative and {where}: set an absolute path on "
                          "storage every node shares, e.g. --set tracking.runs_dir=/mnt/shared/runs")
    for field, path in FAMILIES[cfg.task.family].data_paths(cfg.task).items():
        if not Path(path).expanduser().is_absolute():
            raise ConfigError(f"{field}: {path!r} is relative and {where}: episode workers on every node read it; "
                              "set an absolute path that every node can read (shared storage, or a copy at the "
                              "same path on each)")
    if cfg.tracking.enabled and tracking_uri and tracking_uri.split(":", 1)[0] in ("sqlite", "file"):
        raise ConfigError(f"MLflow store {tracking_uri} is a file on this machine and {where}: the learners log "
                          "from other nodes; set MLFLOW_TRACKING_URI to a tracking server (http://HOST:5000) "
                          "or --set tracking.enabled=false")
