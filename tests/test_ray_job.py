"""Multi-node on one machine: `ray start --head` + a second node on loopback, then `ray job submit`."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ports() -> list[str]:
    """Every port a node opens, chosen free, so this cluster never meets the test session's local Ray."""
    names = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-grpc-port",
             "dashboard-agent-listen-port", "runtime-env-agent-port")
    return [f"--{name}={_free_port()}" for name in names]


@pytest.fixture
def two_node_cluster(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # the job's `python`
    gcs, dashboard, client_port = _free_port(), _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="iai-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    common = ["--block", "--num-cpus=2", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    started = []
    with (tmp_path / "head.log").open("w") as head_log, (tmp_path / "node.log").open("w") as node_log:
        started.append(subprocess.Popen(
            [RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
             f"--ray-client-server-port={client_port}", f"--temp-dir={temp}", *common, *_ports()],
            env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True))
        try:
            _wait_for_dashboard(f"http://127.0.0.1:{dashboard}", started[0], tmp_path / "head.log")
            started.append(subprocess.Popen(
                [RAY, "start", f"--address=127.0.0.1:{gcs}", *common, *_ports()],
                env=env, stdout=node_log, stderr=subprocess.STDOUT, start_new_session=True))
            yield f"http://127.0.0.1:{dashboard}", env
        finally:
            for proc in reversed(started):  # stop what we started, by its process group; nothing else
                _stop(proc)


def _wait_for_dashboard(address: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start --head exited: {log.read_text()[-2000:]}")
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception:
            time.sleep(1)
    pytest.fail(f"the Ray dashboard at {address} did not answer in {timeout:.0f}s")


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def test_ray_job_submit_trains_across_two_nodes(two_node_cluster, tmp_path):
    address, env = two_node_cluster
    runs = tmp_path / "runs"
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri, "RAY_AUTH_MODE": "disabled"}}
    # 2 learners + 2 episode workers at 1 CPU each fill both 2-CPU nodes: the job has to span them
    cmd = [RAY, "job", "submit", f"--address={address}", f"--runtime-env-json={json.dumps(runtime_env)}", "--",
           "python", "-m", "iai_dist.train", "--preset", "tiny", "--set", f"tracking.runs_dir={runs}",
           "--set", "tracking.run_name=job", "--set", "distributed.num_workers=2",
           "--set", "distributed.episode_workers=2", "--set", "train.max_steps=20", "--set", "eval.one_step=false"]
    runs.mkdir()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout and "| refiner |" in proc.stdout

    summary = json.loads((runs / "job" / "summary.json").read_text())
    assert summary["train"]["steps"] == 20 and summary["train"]["nodes"] == 2
    client = MlflowClient(uri)
    mrun = client.get_run((runs / "job" / "mlflow_run_id").read_text())
    assert mrun.info.status == "FINISHED" and "train/heldout_error/step_3" in mrun.data.metrics
