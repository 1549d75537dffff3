"""A multi-node Ray cluster on one machine, started the way users start one (`ray start --head`, then
`ray start --address` per node), for the chaos benchmark and the multi-node tests.

Each node gets its own loopback address (127.0.0.1, 127.0.0.2, ...), so to the service they are separate
machines, and its own free ports. Token authentication is on unless asked otherwise: the head and every node
read the same token. Everything started here is stopped by its process group, never by name.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
PORT_FLAGS = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-grpc-port",
              "dashboard-agent-listen-port", "runtime-env-agent-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LoopbackCluster:
    """`start()` it, submit jobs to `dashboard` with `env`, `kill_node(i)` / `start_node(i)`, then `stop()`."""

    directory: Path
    nodes: int = 2
    cpus_per_node: int = 2
    token: bool = True
    # all nodes in the head's temp dir, as `ray start` does on one machine by default (what a user gets without
    # --temp-dir per node); separate dirs are what separate machines have
    shared_temp: bool = False
    env: dict = field(default_factory=dict)
    dashboard: str = ""
    gcs: str = ""
    processes: dict[int, subprocess.Popen] = field(default_factory=dict)

    def start(self, timeout: float = 120) -> "LoopbackCluster":
        self.directory.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        if self.token:
            token_file = self.directory / "auth_token"
            token_file.write_text(secrets.token_hex(32))
            self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
        else:
            self.env["RAY_AUTH_MODE"] = "disabled"
        self.env.pop("RAY_ADDRESS", None)
        gcs_port, dashboard_port = free_port(), free_port()
        self.gcs, self.dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}"
        # short temp dirs: Ray's socket paths must stay < 108 bytes
        self._temp = [tempfile.mkdtemp(prefix="iai-ray-", dir="/tmp") for _ in range(self.nodes)]
        if self.shared_temp:
            self._temp = [self._temp[0]] * self.nodes
        self._launch(0, ["--head", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
                         "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}"])
        self.wait_for_dashboard(timeout)
        for i in range(1, self.nodes):
            self.start_node(i)
        self.wait_for_nodes(self.nodes, timeout)
        return self

    def _launch(self, i: int, extra: list[str]) -> None:
        log = (self.directory / f"node{i}.log").open("a")
        self.processes[i] = subprocess.Popen(
            [RAY, "start", "--block", f"--num-cpus={self.cpus_per_node}", f"--node-ip-address=127.0.0.{i + 1}",
             f"--temp-dir={self._temp[i]}", "--disable-usage-stats", *[f"--{f}={free_port()}" for f in PORT_FLAGS],
             *extra], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_node(self, i: int) -> None:
        self._launch(i, [f"--address={self.gcs}"])

    def kill_node(self, i: int) -> None:
        """A machine lost at once: every process of the node killed (SIGKILL to its process group)."""
        proc = self.processes.pop(i)
        _signal_group(proc, signal.SIGKILL)
        proc.wait(30)

    def wait_for_dashboard(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[0].poll() is not None:
                raise RuntimeError(f"ray start --head exited: {(self.directory / 'node0.log').read_text()[-2000:]}")
            try:
                return self.get("/api/version")
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"the Ray dashboard at {self.dashboard} did not answer in {timeout:.0f}s")

    def get(self, path: str, with_token: bool = True) -> str:
        """An HTTP GET of the dashboard, with the token (as `ray job submit` sends it) unless asked not to."""
        headers = {}
        if self.token and with_token:
            headers["Authorization"] = f"Bearer {self.token_value()}"
        with urllib.request.urlopen(urllib.request.Request(self.dashboard + path, headers=headers), timeout=10) as r:
            return r.read().decode()

    def wait_for_nodes(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive_nodes() >= count:
                return
            time.sleep(1)
        raise RuntimeError(f"{count} nodes did not join in {timeout:.0f}s")

    def alive_nodes(self) -> int:
        out = subprocess.run([RAY, "list", "nodes", f"--address={self.gcs}", "--filter", "state=ALIVE", "--format=json"],
                             env=self.env, capture_output=True, text=True)
        return out.stdout.count('"node_id"') if out.returncode == 0 else 0

    def stop(self, grace_s: float = 15) -> None:
        """SIGTERM to every node at once (each `ray start --block` stops its node), SIGKILL to what is left."""
        procs, self.processes = list(self.processes.values()), {}
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # also the node's processes that outlived its `ray start`
            proc.wait(10)

    def submit(self, entrypoint: list[str], *, working_dir: Path | None = None, runtime_env: dict | None = None,
               timeout: float = 600, with_token: bool = True, wait: bool = True) -> subprocess.CompletedProcess:
        """`ray job submit` as a user types it; waits for the job (unless `wait` is false) and returns what it
        printed (the job id is on the line 'Job 'raysubmit_...' submitted successfully')."""
        env = dict(self.env)
        if not with_token:
            env.pop("RAY_AUTH_TOKEN_PATH", None)
            env["HOME"] = str(self.directory)  # no ~/.ray/auth_token either
        cmd = [RAY, "job", "submit", f"--address={self.dashboard}", *([] if wait else ["--no-wait"])]
        if working_dir is not None:
            cmd.append(f"--working-dir={working_dir}")
        if runtime_env:
            cmd.append(f"--runtime-env-json={json.dumps(runtime_env)}")
        return subprocess.run([*cmd, "--", *entrypoint], env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=working_dir)

    def jobs(self):
        """The job API's Python client, with the token."""
        from ray.job_submission import JobSubmissionClient

        headers = {"Authorization": f"Bearer {self.token_value()}"} if self.token else None
        return JobSubmissionClient(self.dashboard, headers=headers)

    def token_value(self) -> str:
        return (self.directory / "auth_token").read_text().strip()

    def node_id(self, i: int) -> str | None:
        """Ray's id of node i while it is alive (it listens on 127.0.0.{i + 1})."""
        out = subprocess.run([RAY, "list", "nodes", f"--address={self.gcs}", "--filter", "state=ALIVE",
                              "--filter", f"node_ip=127.0.0.{i + 1}", "--format=json"], env=self.env,
                             capture_output=True, text=True)
        nodes = json.loads(out.stdout) if out.returncode == 0 else []
        return nodes[0]["node_id"] if nodes else None

    def actors(self) -> list[dict]:
        """The alive actors with their class, name, pid and node (Ray's state API, as `ray list actors`)."""
        out = subprocess.run([RAY, "list", "actors", f"--address={self.gcs}", "--detail", "--format=json",
                              "--filter", "state=ALIVE", "--limit=10000"], env=self.env, capture_output=True, text=True)
        return json.loads(out.stdout) if out.returncode == 0 else []


KILLABLE = {
    "episode worker": lambda a: "episode-worker" in (a.get("name") or ""),
    "weight board": lambda a: (a.get("name") or "").endswith("weight-board"),
    "learner": lambda a: a.get("class_name") == "RayTrainWorker",  # Ray Train's worker process
}


def kill_actor(cluster: LoopbackCluster, what: str, actors: list[dict] | None = None) -> int:
    """SIGKILL to the process of one actor of a kind in KILLABLE (from `actors`, else listed now); its pid."""
    for listing in (actors, None):
        for actor in [a for a in (listing or cluster.actors()) if KILLABLE[what](a) and a.get("pid")]:
            try:
                os.kill(actor["pid"], signal.SIGKILL)
                return actor["pid"]
            except ProcessLookupError:  # restarted since it was listed
                continue
    raise RuntimeError(f"no {what} to kill")


STEP_LINE = re.compile(r"\[refiner\] step +(\d+)/")  # a learner's progress line in the job's log
LEARNERS_STARTED = "[precision]"  # the first line rank 0 prints, resumed or not


def follow_with_faults(cluster: LoopbackCluster, job_id: str, plan: dict[int, str], *, node_down_s: float = 10,
                       limit_s: float = 3600) -> dict:
    """Wait for a submitted job, injecting `plan` ({learner step: a KILLABLE kind, or "node" for node 1, killed
    and started again after node_down_s}) as its log reaches each step, one fault at a time.

    The log trails the learners by seconds: their lines from before a fault still arrive after it. So a fault is
    due only when a progress line logged since the previous fault reaches its step, and after a fault that took
    learners down only once the restarted learners have started; faults due at nearby steps would otherwise land
    in one instant and one recovery. A job still running after limit_s is stopped, not waited for.
    Returns the job's status, its whole log, the steps whose faults landed and the seconds taken."""
    client, done, actors, since, restarting, t0 = cluster.jobs(), [], [], 0, False, time.monotonic()
    while not client.get_job_status(job_id).is_terminal():
        if time.monotonic() - t0 > limit_s:
            client.stop_job(job_id)
            break
        logs = client.get_job_logs(job_id)
        if restarting:
            started = logs.find(LEARNERS_STARTED, since)
            if started < 0:
                time.sleep(0.3)
                continue
            since, restarting = started, False
        steps = [int(s) for s in STEP_LINE.findall(logs, since)]
        if steps and not actors:
            # listed once (a listing takes seconds); kill_actor lists again when a PID has gone (restarted since)
            actors = cluster.actors()
        due = [s for s in sorted(plan) if s not in done and steps and max(steps) >= s]
        if due:
            what = plan[due[0]]
            if what == "node":
                node = cluster.node_id(1)
                restarting = any(KILLABLE["learner"](a) and a.get("node_id") == node for a in cluster.actors())
                cluster.kill_node(1)
                time.sleep(node_down_s)
                cluster.start_node(1)
                killed = "node 1"
            else:
                try:
                    killed = f"the {what} (pid {kill_actor(cluster, what, actors)})"
                except RuntimeError:  # none alive this instant: try again
                    actors = []
                    continue
                restarting = what == "learner"
            done.append(due[0])
            since = len(logs)
            print(f"   learner step {max(steps)}: killed {killed}", flush=True)
        time.sleep(0.3)
    return {"status": client.get_job_status(job_id), "logs": client.get_job_logs(job_id), "done": done,
            "seconds": time.monotonic() - t0}


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
