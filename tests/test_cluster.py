"""The service on a two-node cluster, run as users run it: `ray start --head` + `ray start --address` on
loopback (two addresses, so two "machines"), token authentication on, an MLflow tracking server, and
`ray job submit --working-dir .`. Faults are injected by PID."""

import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray.job_submission import JobStatus

from iai_dist.service.loopback import STEP_LINE, LoopbackCluster, follow_with_faults, free_port

ROOT = Path(__file__).resolve().parents[1]
TASKS = 128  # tasks per learner step (the default preset's)
STEPS = 80  # ~15 s of training here: the job log trails the learner by seconds, and the faults must land in it
# 2 learners + 2 episode workers at 1 CPU each fill both 2-CPU nodes: the job has to span them. Staleness 0: every
# batch is rolled out with the learner's current weights, so the job's model is the in-process run's (measured:
# per-step errors equal to rel 2e-6 after 120 steps), the reference the faulted job is held to. With a horizon
# curriculum, K steps to step 20 and 2K after, which the episode workers follow as the learners do: the learner
# fault lands past step 10 (seen: 20-26), so its redone steps cross into or lie in the 2K phase. In fp32: on a CPU
# with native bf16, `auto` rounds two ranks' half batches otherwise than one process's whole batch (rel 1.1e-3 seen)
JOB = ["--preset", "default", "--set", "distributed.num_workers=2", "--set", "distributed.episode_workers=2",
       "--set", "distributed.staleness=0", "--set", "train.autocast=off",
       "--set", "train.horizon=2", "--set", "train.horizon_from=0.25",
       "--set", f"train.max_steps={STEPS}", "--set", "train.log_every=2", "--set", "train.checkpoint_every=10",
       "--set", "eval.one_step=false", "--set", "eval.monitor_episodes=32", "--set", "eval.episodes=64",
       "--set", "eval.lr_grid=[0.1]", "--set", "eval.lr_select_episodes=16"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # shared_temp: both raylets of this machine use the head's temp dir, as `ray start` does by default; the
    # second one's runtime-env agent then re-creates the job's unpacked working dir while the driver runs in it
    c = LoopbackCluster(tmp_path_factory.mktemp("cluster"), nodes=2, cpus_per_node=2, token=True, shared_temp=True)
    c.start()
    yield c
    c.stop(grace_s=2)  # nothing on it to keep: no need to wait for a graceful stop


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """An MLflow tracking server on loopback: what the learners on other machines log to."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/m.db",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=(root / "log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            MlflowClient(uri).search_experiments()
            break
        except Exception:
            time.sleep(1)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


def train_job(cluster, runs: Path, uri: str | None, *extra: str, wait: bool = True):
    env = {"env_vars": {"MLFLOW_TRACKING_URI": uri}} if uri else None
    entry = ["python", "-m", "iai_dist.train", *JOB, "--set", f"tracking.runs_dir={runs}", *extra]
    return cluster.submit(entry, working_dir=ROOT, runtime_env=env, wait=wait)


def test_a_submission_without_the_token_is_refused(cluster):
    proc = cluster.submit(["python", "-c", "print(1)"], with_token=False)
    assert proc.returncode != 0 and "authentication token" in (proc.stdout + proc.stderr)
    with pytest.raises(Exception, match="401"):
        cluster.get("/api/jobs/", with_token=False)
    assert json.loads(cluster.get("/api/version"))  # with it, the job API answers


def test_paths_other_machines_cannot_reach_are_refused_before_any_work(cluster, tmp_path):
    """Both refusals in one submitted job (a job's start-up costs seconds): each command exits 2 with one line."""
    train = ["python", "-m", "iai_dist.train", *JOB]
    relative = [*train, "--set", "tracking.runs_dir=runs", "--set", "tracking.enabled=false"]
    sqlite = [*train, "--set", f"tracking.runs_dir={tmp_path / 'runs'}"]
    # `cd "$PWD"`: the first command's ray.init had the second raylet re-create the job's working dir (see
    # the cluster fixture), so the shell's own cwd is a deleted directory of the same path
    script = (f"{shlex.join(relative)}; echo relative exit $?; cd \"$PWD\"; "
              f"MLFLOW_TRACKING_URI=sqlite:///{tmp_path / 'mlflow.db'} {shlex.join(sqlite)}; echo sqlite exit $?")
    proc = cluster.submit(["sh", "-c", script], working_dir=ROOT)
    out = proc.stdout
    assert "relative exit 2" in out and "sqlite exit 2" in out and "Traceback" not in out, out[-3000:]
    assert re.search(r"error: tracking.runs_dir: 'runs' is relative and this cluster spans machines", out)
    assert "is a file on this machine and this cluster spans machines" in out, out[-3000:]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.fixture(scope="module")
def faulted(cluster, tracking_server, tmp_path_factory):
    """The main job, logging to the MLflow server, with an episode worker, the weight board and a learner killed
    by PID at seeded random learner steps as seen in the job's log, one at a time (loopback.follow_with_faults)."""
    runs = tmp_path_factory.mktemp("runs")
    rng = random.Random(7)
    plan = dict(zip(sorted(rng.sample(range(4, STEPS // 3), 3)), rng.sample(["episode worker", "weight board", "learner"], 3)))
    submitted = train_job(cluster, runs, tracking_server, "--set", "tracking.run_name=chaos", wait=False)
    job = follow_with_faults(cluster, re.search(r"raysubmit_\w+", submitted.stdout).group(0), plan, limit_s=600)
    return {**job, "plan": plan, "run_dir": runs / "chaos"}


def test_the_main_job_submitted_with_its_working_dir_trains_across_both_nodes(faulted, tracking_server):
    assert faulted["status"] == JobStatus.SUCCEEDED, faulted["logs"][-3000:]
    assert "| refiner |" in faulted["logs"]
    logged = {int(s) for s in STEP_LINE.findall(faulted["logs"])}
    missing = sorted(set(range(2, STEPS + 1, 2)) - logged)  # every log step's line, none held back by Ray's dedup
    assert not missing, f"progress lines missing from the job's log: steps {missing}"
    summary = json.loads((faulted["run_dir"] / "summary.json").read_text())
    assert summary["train"]["steps"] == STEPS and summary["train"]["nodes"] == 2
    # evaluated as Ray work, in a process of its own, not by the driver
    assert summary["evaluated_by"]["pid"] != summary["evaluated_by"]["driver_pid"]
    client = MlflowClient(tracking_server)
    mrun = client.get_run((faulted["run_dir"] / "mlflow_run_id").read_text())
    assert mrun.info.status == "FINISHED" and "train/heldout_error/step_3" in mrun.data.metrics


def test_a_job_survives_a_killed_episode_worker_weight_board_and_learner(faulted, tmp_path):
    """Every fault landed; the job completed, every step learned its own episodes once (the cursor), and the
    model equals the same job's run in process: redone steps saw the same transitions."""
    assert faulted["status"] == JobStatus.SUCCEEDED, faulted["logs"][-3000:]
    assert sorted(faulted["done"]) == sorted(faulted["plan"]), f"killed at {faulted['done']} of {faulted['plan']}"
    summary = json.loads((faulted["run_dir"] / "summary.json").read_text())
    assert summary["train"]["episodes"] == STEPS * TASKS  # the cursor: learner steps x tasks per step
    in_process = ["--set", "distributed.num_workers=0", "--set", "distributed.episode_workers=0",
                  "--set", "tracking.enabled=false", "--set", f"tracking.runs_dir={tmp_path}",
                  "--set", "tracking.run_name=reference"]
    proc = subprocess.run([sys.executable, "-m", "iai_dist.train", *JOB, *in_process], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert summary["per_step"]["refiner"] == pytest.approx(reference["per_step"]["refiner"], rel=1e-3)


def test_a_sweep_submitted_with_its_working_dir(cluster, tmp_path):
    """Untracked (the jobs above cover MLflow across machines): the trial's run, not its logging, is the point.
    One trial (several at once are tested on the local Ray and planned from an autoscaler's limits below)."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"preset": "tiny", "set": {
        "eval.one_step": False, "train.max_steps": 10, "train.log_every": 5, "distributed.num_workers": 1,
        "distributed.episode_workers": 1, "distributed.learner_cpus": 0.5, "distributed.episode_worker_cpus": 0.5},
        "params": {"task.steps": {"grid": [2]}}, "early_stopping": None}))
    proc = cluster.submit(["python", "-m", "iai_dist.tune", "--space", str(space), "--name", "steps",
                           "--set", f"tracking.runs_dir={tmp_path}", "--set", "tracking.enabled=false"], working_dir=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 trial(s), 1 at a time" in proc.stdout
    rows = (tmp_path / "steps" / "summary.csv").read_text().splitlines()
    assert len(rows) == 2 and ",finished," in rows[1]


FAKE_AUTOSCALING = {
    "cluster_name": "iai-fake", "max_workers": 4, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "cpu_worker": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 3}},
    "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
    "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": []}


@pytest.mark.slow
def test_sweep_concurrency_comes_from_what_an_autoscaling_cluster_can_scale_to(tmp_path):
    """Ray's fake multi-node provider: a head with no CPUs whose autoscaler can add up to three 2-CPU nodes.
    Nothing can run at the start; a driver on the head reads the autoscaler's limits and plans 3 trials at
    once (a tiny trial holds 2 CPUs), where the resources alive at the start would give none."""
    port = free_port()
    config = {**FAKE_AUTOSCALING, "provider": {**FAKE_AUTOSCALING["provider"], "gcs_address": f"127.0.0.1:{port}"}}
    (tmp_path / "autoscaling.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "disabled", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=0", f"--port={port}",
         "--node-ip-address=127.0.0.1", f"--dashboard-port={free_port()}", "--disable-usage-stats",
         f"--autoscaling-config={tmp_path / 'autoscaling.yaml'}", f"--temp-dir={tempfile.mkdtemp(prefix='iai-', dir='/tmp')}"],
        env=env, stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"preset": "tiny", "set": {
        "distributed.num_workers": 1, "distributed.episode_workers": 1, "distributed.learner_cpus": 0.5,
        "distributed.episode_worker_cpus": 0.5}, "params": {"train.seed": {"grid": [0, 1, 2, 3, 4]}}}))
    driver = ("import ray, json\n"
              f"ray.init(address='127.0.0.1:{port}')\n"
              "from iai_dist.search_space import load_space\n"
              "from iai_dist.service.capacity import cluster_capacity\n"
              "from iai_dist.service.sweep import trials_at_once\n"
              f"space, base = load_space('{space}')\n"
              "c = cluster_capacity()\n"
              "print(json.dumps({'source': c.source, 'describe': c.describe(), 'alive_cpus': ray.cluster_resources()"
              ".get('CPU', 0), 'at_once': trials_at_once(base, space, None, c)}))\n")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the GCS accepts connections, then the monitor has read its config
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        for _ in range(10):
            proc = subprocess.run([sys.executable, "-c", driver], env={**env, "RAY_FAKE_CLUSTER": ""},
                                  capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                break
            time.sleep(1)
        assert proc.returncode == 0, proc.stderr[-2000:] + (tmp_path / "head.log").read_text()[-2000:]
        seen = json.loads(proc.stdout.strip().splitlines()[-1])
        assert seen["source"].startswith("autoscaler config") and "3 x cpu_worker {CPU: 2}" in seen["describe"]
        assert seen["alive_cpus"] == 0 and seen["at_once"] == 3
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the head's whole process group: nothing of it is kept
        head.wait(30)
