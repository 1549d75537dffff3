"""The Ray service on a real local Ray: episode workers + Ray Train learners, faults, exact resume, the CLI."""

import json
import os
import signal
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray import cloudpickle

from iai_dist import checkpoint, train
from iai_dist.checkpoint import CheckpointError, read_checkpoint
from iai_dist.learner import ServiceError
from iai_dist.service.fit import episode_worker_name, fit

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hooks below run inside Train workers

SERVICE = {"distributed.learner_cpus": 0.5, "distributed.episode_worker_cpus": 0.5, "eval.monitor_episodes": 64}


class Hook:
    """on_step for the learners: an episode ledger line per rank and step, and a learner failure if asked."""

    def __init__(self, ledger: Path, fail_at: int | None = None):
        self.ledger, self.fail_at = ledger, fail_at
        self.marker = ledger.with_suffix(".failed")

    def __call__(self, rank: int, step: int, tr) -> None:
        with self.ledger.open("a") as f:
            f.write(f"{rank} {step} {tr.first_episode} {tr.num_tasks} {tr.version}\n")
        if rank == 0 and step == self.fail_at and not self.marker.exists():
            self.marker.touch()
            raise RuntimeError("injected learner failure")


def read_ledger(path: Path) -> dict[tuple[int, int], set[tuple[int, int, int]]]:
    """(rank, step) -> every (first episode, count, weight version) it was learned from (a redone step twice)."""
    seen = defaultdict(set)
    for line in path.read_text().split("\n"):
        if line:
            rank, step, first, count, version = map(int, line.split())
            seen[rank, step].add((first, count, version))
    return seen


def check_ledger(seen, steps: range, ranks: int, tasks: int, staleness: int) -> None:
    """Every step learned each rank's slice of its own episodes, rolled out with the version `staleness` steps
    back, the same on a redo; together the steps cover episodes 0 .. steps * tasks once, none skipped."""
    assert set(seen) == {(r, s) for r in range(ranks) for s in steps}
    covered = []
    for (rank, step), batches in seen.items():
        assert len(batches) == 1, (rank, step, batches)  # a redone step learned from the very same batch
        first, count, version = next(iter(batches))
        assert (first, count) == ((step - 1) * tasks + rank * tasks // ranks, tasks // ranks)
        assert version == max(step - 1 - staleness, 0)
        covered.extend(range(first, first + count))
    assert sorted(covered) == list(range((steps.start - 1) * tasks, (steps.stop - 1) * tasks))


def _sqlite(path: Path) -> str:
    return f"sqlite:///{path}"


def test_ray_training_is_exact_across_a_learner_failure_and_resumes_with_more_workers(ray_local, tiny_cfg, tmp_path):
    cfg = tiny_cfg.with_overrides({**SERVICE, "distributed.num_workers": 1, "distributed.episode_workers": 1,
                                   "train.max_steps": 24, "train.log_every": 4, "train.checkpoint_every": 8})
    plain = fit(cfg, tmp_path / "plain", on_step=Hook(tmp_path / "plain.txt"))
    failing = Hook(tmp_path / "failing.txt", fail_at=13)
    # Ray Train's checkpoints on "remote" storage (a pyarrow filesystem URI), restored from there after the failure
    store = tmp_path / "store"
    result = fit(cfg.with_overrides({"tracking.storage": store.as_uri()}), tmp_path / "failing", on_step=failing)
    assert list((store / "failing").glob("checkpoint_*")) and not list((tmp_path / "failing").glob("checkpoint_*"))

    steps = [int(line.split()[1]) for line in failing.ledger.read_text().split("\n") if line]
    assert steps == list(range(1, 14)) + list(range(9, 25))  # failed at 13, redid steps 9.. from the step-8 checkpoint
    check_ledger(read_ledger(failing.ledger), range(1, 25), ranks=1, tasks=32, staleness=1)
    a, b = read_checkpoint(plain.checkpoint)[0], read_checkpoint(result.checkpoint)[0]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name  # the same weights as the undisturbed run

    with pytest.raises(CheckpointError, match="train.lr"):
        fit(cfg.with_overrides({"train.lr": 0.1}), tmp_path / "plain")

    # resumed with a longer schedule and twice the episode workers: every episode index once, both workers used
    longer = cfg.with_overrides({"train.max_steps": 36, "distributed.episode_workers": 2})
    hook = Hook(tmp_path / "plain.txt")
    more = fit(longer, tmp_path / "plain", on_step=hook)
    assert more.service["start_step"] == 24 and more.service["episodes"] == 36 * 32
    check_ledger(read_ledger(hook.ledger), range(1, 37), ranks=1, tasks=32, staleness=1)
    assert all(w["batches_this_incarnation"] >= 6 for w in more.workers)

    # a copy Ray never registered (its learner's node lost mid-report) is passed over; a registered checkpoint
    # that cannot be read stops the run
    newest = max(p for p in (tmp_path / "plain").glob("checkpoint_*") if p.is_dir()) / "checkpoint.pt"
    cut_off = tmp_path / "plain" / "checkpoint_2999-01-01_00-00-00.000000" / "checkpoint.pt"
    cut_off.parent.mkdir()
    cut_off.write_bytes(newest.read_bytes()[:4096])
    assert checkpoint.step_of(checkpoint.newest(tmp_path / "plain")) == 36
    newest.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        fit(longer, tmp_path / "plain")


def test_train_cli_on_ray_logs_one_mlflow_run_with_service_metrics_and_sample_pictures(ray_local, tmp_path, capsys,
                                                                                     monkeypatch):
    """A generative family end to end on the service: flow-matching episodes from the workers, the learner,
    the evaluation as Ray work with sample-quality scores, one MLflow run with the metrics and the pictures."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    generative = ["task.family=gaussian_mixture", "task.dim=2", "regime.model=mixture", "eval.sample_tasks=4",
                  "eval.samples=200", "eval.horizon=1"]
    argv = ["--preset", "tiny", "--set", "tracking.run_name=onray", "--set", f"tracking.runs_dir={tmp_path}",
            "--set", "distributed.num_workers=1", "--set", "distributed.episode_workers=1",
            "--set", "train.max_steps=60", *[f"--set={k}={v}" for k, v in SERVICE.items()],
            *[f"--set={o}" for o in generative]]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "| refiner |" in out and "| one_step |" in out and "sw2 on held-out tasks" in out
    run_dir = tmp_path / "onray"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"]["steps"] == 60 and summary["train"]["episodes"] == 60 * 32
    assert summary["evaluated_by"]["pid"] != os.getpid() and summary["evaluated_by"]["device"] == "cpu"
    assert {"refiner", "em", "adam", "one_step", "floor"} <= set(summary["generative"]["sets"]["test"]["sw2"])
    assert (run_dir / "one_step" / "checkpoint.pt").exists()

    client = MlflowClient(_sqlite(tmp_path / "mlflow.db"))
    mrun = client.get_run((run_dir / "mlflow_run_id").read_text())
    assert mrun.info.status == "FINISHED" and mrun.data.params["distributed.num_workers"] == "1"
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "train/loss")] == [10, 20, 30, 40, 50, 60]
    assert "one_step/learner_idle_pct" in mrun.data.metrics and "eval/refiner/error" in mrun.data.metrics
    assert sorted(m.step for m in client.get_metric_history(mrun.info.run_id, "eval/sw2/refiner")) == [1, 2, 3]
    assert any(name.startswith("system/cpu") for name in mrun.data.metrics)  # the driver's machine
    assert "system/learner_0/cpu_utilization_percentage" in mrun.data.metrics  # the learner's
    artifacts = {a.path for a in client.list_artifacts(mrun.info.run_id)}
    assert {"summary.json", "config.yaml", "error_vs_step.png", "samples.png", "checkpoint.pt"} <= artifacts


def test_an_episode_worker_that_crashes_every_time_ends_the_run_with_one_line(ray_local, tmp_path, capsys):
    """Its process is killed as soon as it runs, every time: once Ray has restarted it
    distributed.worker_restarts times, the command stops with one line naming the worker and the setting."""
    name, stop = episode_worker_name(tmp_path / "crash", "refiner", 0), threading.Event()

    def crash_forever():
        while not stop.is_set():
            try:
                os.kill(ray.get(ray.get_actor(name).info.remote(), timeout=5)["pid"], signal.SIGKILL)
            except Exception:  # not started yet, restarting, or dead for good
                pass
            time.sleep(0.3)

    killer = threading.Thread(target=crash_forever, daemon=True)
    killer.start()
    argv = ["--preset", "tiny", "--set", "tracking.enabled=false", f"--set=tracking.runs_dir={tmp_path}",
            "--set", "tracking.run_name=crash", "--set", "distributed.num_workers=1", "--set", "distributed.episode_workers=1",
            "--set", "distributed.worker_restarts=1", "--set", "distributed.max_failures=0", "--set", "train.max_steps=400",
            *[f"--set={k}={v}" for k, v in SERVICE.items()]]
    start = time.monotonic()
    try:
        assert train.main(argv) == 1
    finally:
        stop.set()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "episode worker 0 died and Ray restarts it no more (distributed.worker_restarts=1" in err
    assert time.monotonic() - start < 180


def test_learners_that_cannot_be_placed_stop_the_run_with_one_line(ray_local, tiny_cfg, tmp_path):
    """A learner asking for more CPUs than the cluster has (or can scale to) is not waited for forever."""
    cfg = tiny_cfg.with_overrides({**SERVICE, "distributed.num_workers": 1, "distributed.episode_workers": 1,
                                   "distributed.learner_cpus": 64, "distributed.placement_timeout_s": 5})
    start = time.monotonic()
    with pytest.raises(ServiceError, match=r"the 1 learner\(s\) \(\{'CPU': 64.0\} each\) were not placed within 5s"):
        fit(cfg, tmp_path / "unplaced")
    assert time.monotonic() - start < 120


def test_weights_reach_the_board_from_the_publisher_thread_and_its_errors_reach_the_learner(ray_local):
    """Rank 0 packs and publishes from a thread (on a GPU, once each asynchronous copy is complete): versions
    arrive in order, and the board's process never loads torch; a publication that cannot be packed (an
    unpicklable weight) stops the next send with its error."""
    from iai_dist.service.board import WeightBoard
    from iai_dist.service.episode_worker import unpack_weights
    from iai_dist.service.feed import Publisher

    board = ray.remote(num_cpus=0)(WeightBoard).remote()
    ray.get(board.ensure.remote(0, {}))  # rank 0 opens its generation before publishing
    publisher = Publisher(board)
    for version in (1, 2, 3):
        publisher.send(0, version, {"w": torch.full((2,), float(version))}, None, keep_from=2)
    deadline = time.monotonic() + 30
    while ray.get(board.missing.remote(0, [2, 3])) and time.monotonic() < deadline:
        time.sleep(0.05)
    status, refs = ray.get(board.get.remote(0, 3))
    assert status == "ready" and torch.equal(unpack_weights(ray.get(refs[0]), torch.device("cpu"))["w"],
                                             torch.full((2,), 3.0))
    info = ray.get(board.info.remote())
    assert info["versions"] == [2, 3]  # version 1 dropped: kept from 2 on
    assert "libtorch" not in Path(f"/proc/{info['pid']}/maps").read_text()
    publisher.send(0, 4, {"w": threading.Lock()}, None, keep_from=2)
    while publisher.error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(RuntimeError, match="the weight publisher stopped"):
        publisher.send(0, 5, {"w": torch.zeros(2)}, None, keep_from=2)


def test_a_request_reaches_an_episode_worker_only_once_its_weights_exist(ray_local, tiny_cfg):
    """Ray may re-run a restarted actor's retried tasks in any order, so no request may sit at a worker waiting
    for weights that only a request behind it lets the learner make: before every step each request in flight
    names a version the learner has made, as does each one sent while it learns, and the buffer is still full
    (staleness + 1: the overlap is kept). The default staleness, and one with publications every other step."""
    from iai_dist.experience import EpisodeStream
    from iai_dist.learner import Learner
    from iai_dist.service.board import WeightBoard
    from iai_dist.service.episode_worker import EpisodeWorker, pack_weights
    from iai_dist.service.feed import RayFeed, VersionSchedule

    board = ray.remote(num_cpus=0)(WeightBoard).options(name="feed-order").remote()
    worker = ray.remote(EpisodeWorker).options(num_cpus=0.5).remote(tiny_cfg.model_dump(mode="json"), 0, "feed-order",
                                                                    False)
    steps = 7
    try:
        for generation, (staleness, sync_every) in enumerate([(1, 1), (2, 2)], start=1):
            cfg = tiny_cfg.with_overrides({"distributed.staleness": staleness, "distributed.sync_every": sync_every})
            learner = Learner(cfg, "cpu")
            window = {0: {k: t.detach().clone() for k, t in learner.model.state_dict().items()}}
            ray.get(board.ensure.remote(generation, {0: pack_weights(window[0])}))
            stream = EpisodeStream(cfg.train.tasks_per_batch, 0, 1, 0)
            schedule = VersionSchedule(staleness, sync_every, 0, [0])
            feed = RayFeed(learner, stream, {0: worker}, board, generation, schedule, window, steps)
            while learner.step < steps:
                in_flight = [s for s, _, _ in feed.pending]
                assert in_flight == list(range(learner.step, min(learner.step + staleness + 1, steps)))
                assert all(schedule.version_for(s) in feed.window for s in in_flight), (learner.step, in_flight)
                tr, _ = feed.next(learner.step)
                sent = [s for s, _, _ in feed.pending]
                assert all(schedule.version_for(s) in feed.window for s in sent), (learner.step, sent)
                stream.take(tr, learner.step)
                assert tr.version == schedule.version_for(learner.step)
                learner.learn(tr)
                feed.learned(learner)
    finally:
        ray.kill(worker)
        ray.kill(board)
