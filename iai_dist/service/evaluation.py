"""Evaluation as Ray work with a learner's resources, never on the driver: the head of a cluster may have no
GPU and few CPUs (the shipped configs give it none for training), and evaluation scores 1,024 episodes
against Adam/SGD learning-rate grids and L-BFGS fits."""

from __future__ import annotations

import os

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from iai_dist.config import ExperimentConfig, validate
from iai_dist.evaluate import evaluate_trained


def _evaluate(cfg_data: dict, state: dict, one_step_state: dict | None, device: str) -> dict:
    summary = evaluate_trained(validate(cfg_data, "evaluation config"), state, one_step_state, device)
    ctx = ray.get_runtime_context()
    summary["evaluated_by"] = {"pid": os.getpid(), "node": ctx.get_node_id(), "device": device,
                               "gpus": ctx.get_accelerator_ids().get("GPU", [])}
    return summary


def evaluate_on_cluster(cfg: ExperimentConfig, state: dict, one_step_state: dict | None) -> dict:
    """The summary, computed by a task that asks for what one learner gets (a GPU with distributed.use_gpu).
    It is scheduled outside any placement group it would be captured by (a sweep trial's holds only the trial
    process and its episode workers), so that it can get the GPU. Its device is what it reserved, as for
    episode workers: Ray leaves a GPU node's cards visible to work that asked for none."""
    d = cfg.distributed
    task = ray.remote(_evaluate).options(
        num_cpus=d.learner_cpus, num_gpus=d.learner_gpus if d.use_gpu else 0, max_retries=2,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )
    device = "cuda" if d.use_gpu else "cpu"
    summary = ray.get(task.remote(cfg.model_dump(mode="json"), state, one_step_state, device))
    summary["evaluated_by"]["driver_pid"] = os.getpid()
    return summary
