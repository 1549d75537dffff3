"""Where the job's Ray comes from: the cluster it was submitted to, or an embedded one sized to the machine."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Iterator

import ray

from iai_dist.config import ConfigError, ExperimentConfig


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
        ray.init(log_to_driver=True)
    else:
        # No token to hand out on a laptop; set RAY_AUTH_MODE=token yourself to keep Ray's default.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Logical CPUs may exceed the cores: a 2-core laptop still fits 1 learner + 1 episode worker.
        # The dashboard stays on: Ray Train's placement-group cleaner watches the run through its state API.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus_needed(cfg)), log_to_driver=True)
        if cfg.distributed.use_gpu and not ray.cluster_resources().get("GPU"):
            ray.shutdown()
            raise ConfigError("distributed.use_gpu: this machine has no GPU that Ray can see; set it to false")
    try:
        yield
    finally:
        ray.shutdown()
