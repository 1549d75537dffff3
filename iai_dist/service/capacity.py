"""What the connected cluster can scale to, and how many trainings of a sweep fit in it at once.

An autoscaling cluster starts small (the shipped configs: a CPU-only head, GPU workers from zero), so the
resources alive at the start say little. Ray 2.60 has no public API for the autoscaler's limits; they are read
from where the autoscaler itself reads them, first found wins:
  - KubeRay: the RayCluster resource (RAY_CLUSTER_NAME, the pod's service account)
  - the cluster launcher: ~/ray_bootstrap_config.yaml on the head (where a `ray job submit` driver runs)
  - any head started with `ray start --autoscaling-config=PATH`: the autoscaler monitor's command line
  - otherwise: the nodes alive now (a fixed cluster).
Trainings are then packed onto those nodes bundle by bundle, as the scheduler places them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml

BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml").expanduser()
ALIVE = "the nodes alive now (no autoscaler config found)"


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    count: int  # how many nodes of this type the cluster can have at once


@dataclass(frozen=True)
class Capacity:
    node_types: tuple[NodeType, ...]
    source: str  # where the limits were read

    def describe(self) -> str:
        return ", ".join(f"{t.count} x {t.name} {_fmt(t.resources)}" for t in self.node_types) or "no nodes"

    @property
    def hosts(self) -> int:
        """Nodes the cluster can have at once."""
        return sum(t.count for t in self.node_types)

    @property
    def spans_machines(self) -> bool:
        """Whether its nodes can be on more than one machine (alive nodes: distinct IP addresses)."""
        if self.source == ALIVE:
            return len({t.name for t in self.node_types}) > 1
        return self.hosts > 1


def cluster_capacity() -> Capacity:
    """The connected cluster's node types and how many of each it can scale to."""
    for reader in (_kuberay, _bootstrap_file, _monitor_command_line):
        try:
            found = reader()
        except Exception:  # a source that is not there or not readable: try the next
            found = None
        if found is not None:
            return found
    return _alive_nodes()


def from_autoscaling_config(config: dict, source: str) -> Capacity:
    """Node types of a cluster launcher / autoscaler config (available_node_types, max_workers)."""
    head = config.get("head_node_type")
    budget = config.get("max_workers", math.inf)  # worker nodes in all, on top of the head
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        count = 1 if name == head else min(int(spec.get("max_workers", budget)), budget)
        if count > 0:
            types.append(NodeType(name, resources, int(count)))
    return Capacity(tuple(types), source)


def _kuberay() -> Capacity | None:
    name = os.environ.get("RAY_CLUSTER_NAME")
    namespace_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if not name or not namespace_file.exists():
        return None
    from ray.autoscaler._private.kuberay.autoscaling_config import AutoscalingConfigProducer

    namespace = namespace_file.read_text().strip()
    return from_autoscaling_config(AutoscalingConfigProducer(name, namespace)(), f"RayCluster {namespace}/{name}")


def _bootstrap_file() -> Capacity | None:
    if not BOOTSTRAP_CONFIG.is_file():
        return None
    return from_autoscaling_config(yaml.safe_load(BOOTSTRAP_CONFIG.read_text()), str(BOOTSTRAP_CONFIG))


def _monitor_command_line() -> Capacity | None:
    """The autoscaler monitor of this machine's head, if it runs with a config (`ray start --autoscaling-config`)."""
    import psutil

    gcs_port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[-1]
    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info["cmdline"] or []
        if not any(a.endswith("monitor.py") for a in args) or not any(gcs_port in a for a in args):
            continue
        path = next((a.split("=", 1)[1] for a in args if a.startswith("--autoscaling-config=")), None)
        if path and Path(path).is_file():
            return from_autoscaling_config(yaml.safe_load(Path(path).read_text()), f"autoscaler config {path}")
    return None


def _alive_nodes() -> Capacity:
    """Each alive node as a type of its own, named by its IP address (raylets of one machine share it)."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    return Capacity(tuple(NodeType(n["NodeManagerAddress"], {k: float(v) for k, v in n["Resources"].items()
                                                             if not k.startswith("node:")}, 1) for n in nodes), ALIVE)


def fits(capacity: Capacity, training: list[dict[str, float]], limit: int) -> int:
    """How many copies of `training` (its resource bundles) fit at once, up to `limit`: each bundle first-fit
    on the nodes opened so far, else on a new node of the smallest type that takes it (as the autoscaler
    picks), largest bundles first."""
    free: list[dict[str, float]] = []
    opened = {t.name: 0 for t in capacity.node_types}
    by_size = sorted(capacity.node_types, key=lambda t: (sum(t.resources.values()), t.name))
    bundles = sorted(training, key=lambda b: -sum(b.values()))
    for n in range(limit):
        for bundle in bundles:
            node = next((f for f in free if _holds(f, bundle)), None)
            if node is None:
                kind = next((t for t in by_size if opened[t.name] < t.count and _holds(t.resources, bundle)), None)
                if kind is None:
                    return n
                opened[kind.name] += 1
                node = dict(kind.resources)
                free.append(node)
            for k, v in bundle.items():
                node[k] = node.get(k, 0.0) - v
    return limit


def _holds(free: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) >= v - 1e-9 for k, v in bundle.items() if v > 0)


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if v) + "}"
