"""The Ray service on a real local Ray: episode workers + Ray Train learners, failures, resume, the CLI."""

import json
import sys
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray import cloudpickle

from iai_dist import train
from iai_dist.learner import GreedyObjective, learner_step
from iai_dist.rollout import make_transitions
from iai_dist.service import fit
from iai_dist.service.fit import episode_worker_name
from iai_dist.tracking import RunLogger
from iai_dist.training import CheckpointError, Trainer

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hooks below run inside Train workers

SERVICE = {"distributed.learner_cpus": 0.5, "distributed.episode_worker_cpus": 0.5, "eval.monitor_episodes": 64}


def _kill_episode_worker(name: str, at_step: int, rank: int, step: int) -> None:
    if rank == 0 and step == at_step:
        ray.kill(ray.get_actor(name), no_restart=False)  # a crash: Ray may restart it


def _fail_once(marker: Path, log: Path, at_step: int, rank: int, step: int) -> None:
    if rank == 0:
        with log.open("a") as f:
            f.write(f"{step}\n")
        if step == at_step and not marker.exists():
            marker.touch()
            raise RuntimeError("injected learner failure")


def _sqlite(path: Path) -> str:
    return f"sqlite:///{path}"


def test_two_learners_two_episode_workers_learn_and_survive_a_killed_worker(ray_local, tiny_cfg, tmp_path):
    cfg = tiny_cfg.with_overrides({**SERVICE, "distributed.num_workers": 2, "distributed.episode_workers": 2,
                                   "train.max_steps": 40, "train.log_every": 5, "train.checkpoint_every": 20})
    run_dir = tmp_path / "killed"
    client = MlflowClient(_sqlite(tmp_path / "mlflow.db"))
    run_id = client.create_run(client.create_experiment("service")).info.run_id
    hook = lambda rank, step: _kill_episode_worker(episode_worker_name(run_dir, "refiner", 1), 8, rank, step)  # noqa: E731

    result = fit(cfg, run_dir, RunLogger(_sqlite(tmp_path / "mlflow.db"), run_id), on_step=hook)

    assert result.service["steps"] == 40 and result.service["start_step"] == 0
    by_index = {w["index"]: w for w in result.workers}
    assert by_index[1]["restarted"] and not by_index[0]["restarted"]
    # the restarted worker went on with its slice (the feed checks every batch number in order): its new
    # incarnation made fewer batches than were consumed from the slice
    assert 0 < by_index[1]["batches_this_incarnation"] < result.cursors[1]
    assert sum(result.cursors) * 16 >= 40 * 32  # each rank takes one 16-episode batch per step
    k = cfg.task.steps
    heldout = [m.value for m in client.get_metric_history(run_id, f"train/heldout_error/step_{k}")]
    assert len(heldout) == 8 and heldout[-1] < 0.7 * heldout[0]  # learning, on fixed held-out episodes
    metrics = client.get_run(run_id).data.metrics
    for name in ("train/transitions_per_s", "train/learner_idle_pct", "train/staleness_mean", "train/dropped_transitions"):
        assert name in metrics
    assert 0 <= metrics["train/staleness_max"] <= cfg.distributed.max_staleness
    ckpt = torch.load(result.checkpoint, weights_only=False)
    assert ckpt["step"] == 40 and ckpt["episode_cursors"] == result.cursors


def test_learner_failure_resumes_from_checkpoint_and_a_resubmitted_run_resumes(ray_local, tiny_cfg, tmp_path):
    cfg = tiny_cfg.with_overrides({**SERVICE, "distributed.num_workers": 1, "distributed.episode_workers": 1,
                                   "train.max_steps": 24, "train.log_every": 4, "train.checkpoint_every": 8})
    run_dir, marker, log = tmp_path / "failing", tmp_path / "failed-once", tmp_path / "steps.txt"
    hook = lambda rank, step: _fail_once(marker, log, 13, rank, step)  # noqa: E731

    result = fit(cfg, run_dir, on_step=hook)

    steps = [int(s) for s in log.read_text().split()]
    assert steps == list(range(1, 14)) + list(range(9, 25))  # failed at 13, went on from the step-8 checkpoint
    assert result.service["start_step"] == 8 and result.service["steps"] == 24

    again = fit(cfg, run_dir)  # the same run submitted again: resumes (here: nothing left to do)
    assert again.service["start_step"] == 24 and again.cursors == result.cursors

    with pytest.raises(CheckpointError, match="different config"):
        fit(cfg.with_overrides({"train.lr": 0.1}), run_dir)
    newest = max(p for p in run_dir.glob("checkpoint_*") if p.is_dir()) / "checkpoint.pt"
    newest.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        fit(cfg, run_dir)


def test_train_cli_on_ray_logs_one_mlflow_run_with_service_metrics(ray_local, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = ["--preset", "tiny", "--set", "tracking.run_name=onray", "--set", f"tracking.runs_dir={tmp_path}",
            "--set", "distributed.num_workers=1", "--set", "distributed.episode_workers=1",
            "--set", "train.max_steps=20", *[f"--set={k}={v}" for k, v in SERVICE.items()]]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "| refiner |" in out and "| one_step |" in out
    run_dir = tmp_path / "onray"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"]["steps"] == 20 and summary["train"]["episode_cursors"][0] >= 20
    assert (run_dir / "one_step" / "checkpoint.pt").exists()

    client = MlflowClient(_sqlite(tmp_path / "mlflow.db"))
    mrun = client.get_run((run_dir / "mlflow_run_id").read_text())
    assert mrun.info.status == "FINISHED" and mrun.data.params["distributed.num_workers"] == "1"
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "train/loss")] == [10, 20]
    assert "one_step/learner_idle_pct" in mrun.data.metrics and "eval/refiner/step_3" in mrun.data.metrics
    assert any(name.startswith("system/") for name in mrun.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(mrun.info.run_id)}
    assert {"summary.json", "config.yaml", "error_vs_step.png", "checkpoint.pt"} <= artifacts


@pytest.mark.parametrize("kind,signal", [("parametric", "obs"), ("parametric", "grad"), ("explicit", "obs+grad"),
                                         ("implicit", "obs")])
def test_the_greedy_step_runs_under_ddp(tiny_cfg, tmp_path, kind, signal):
    """DDP (as on Ray Train) finds a gradient for every parameter each step, in every regime."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        trainer = Trainer(tiny_cfg.with_overrides({"regime.kind": kind, "regime.signal": signal}))
        ddp = torch.nn.parallel.DistributedDataParallel(GreedyObjective(trainer.model))
        for _ in range(3):  # an unused parameter would fail on the second step
            tr = make_transitions(trainer.model, trainer.next_episodes())
            stats = learner_step(ddp, trainer.optimizer, trainer.scheduler, tr, trainer.cfg.train, trainer.cfg.task.steps)
            assert not stats.skipped
    finally:
        dist.destroy_process_group()
