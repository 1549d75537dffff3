"""The cluster launcher configs validate against Ray's own schema; deploy.yaml is a usable KubeRay RayJob."""

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from iai_dist.config import load_config
from iai_dist.train import parse_args

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name,provider", [("aws", "aws"), ("gcp", "gcp"), ("local", "local")])
def test_launcher_config_validates_against_the_ray_schema(name, provider):
    config = yaml.safe_load((ROOT / "cluster" / f"{name}.yaml").read_text())
    jsonschema.validate(config, SCHEMA)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before launching anything
    assert config["provider"]["type"] == provider
    assert config["docker"]["image"].endswith("iai-dist:latest")  # the image of cluster/Dockerfile
    # token authentication on every node, the dashboard (the job API) on the head's loopback only
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH=" in c for c in starts)
    assert "--dashboard-host=127.0.0.1" in starts[0] and "0.0.0.0" not in json.dumps(config)
    assert config["file_mounts"] == {"~/ray_auth_token": "~/.ray/auth_token"}
    if provider != "local":
        worker = config["available_node_types"]["gpu_worker"]["node_config"]
        assert "g5" in worker.get("InstanceType", "") or worker.get("guestAccelerators")


def test_container_recipe_installs_the_project_on_the_pinned_ray():
    recipe = (ROOT / "cluster" / "Dockerfile").read_text()
    pin = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines() if "ray[" in line)
    assert "FROM rayproject/ray:2.60.0-" in recipe and "2.60.0" in pin
    assert "pip install --no-cache-dir ." in recipe
    assert "driver >= 580" in recipe.replace("\n# ", " ") and "RAY_AUTH_MODE=disabled" not in recipe


def test_deploy_yaml_is_a_rayjob_with_head_gpu_workers_mlflow_and_shared_storage():
    docs = list(yaml.safe_load_all((ROOT / "deploy.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}  # KubeRay >= 1.5.1 hands out the token
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "iai_dist.train"]
    args = parse_args(argv[3:])
    cfg = load_config(args.preset, args.config, args.overrides)  # the entrypoint's config is valid
    assert cfg.distributed.use_gpu and cfg.distributed.num_workers >= 1

    spec = job["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]["template"]["spec"]
    groups = spec["workerGroupSpecs"]
    gpu = [g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu, "no worker group asks for GPUs"
    pods = [head] + [g["template"]["spec"] for g in groups]
    for pod in pods:
        container = pod["containers"][0]
        assert any(e["name"] == "MLFLOW_TRACKING_URI" for e in container["env"])
        assert not any(e["name"] == "RAY_AUTH_MODE" for e in container["env"])  # KubeRay would not override it
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert cfg.tracking.runs_dir.startswith(tuple(mounts)), "checkpoints must go to the shared volume"
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == ["iai-dist-shared"]
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "iai-dist-shared" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    # enough GPUs for what the entrypoint asks
    d = cfg.distributed
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * g["replicas"] for g in gpu)
    assert gpus >= d.num_workers * d.learner_gpus + d.episode_workers * d.episode_worker_gpus


def test_a_job_on_a_cluster_spanning_machines_refuses_relative_data_paths(tmp_path):
    """Episode workers on every node read the family's files: a relative image root or embeddings file (which
    each node would resolve against its own working directory) stops the job, naming the field."""
    from iai_dist.config import ConfigError
    from iai_dist.service.capacity import from_autoscaling_config
    from iai_dist.service.runtime import check_shared_paths

    aws = from_autoscaling_config(yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text()), "aws.yaml")
    runs = str(tmp_path / "runs")
    off = ["tracking.enabled=false"]
    emb = ["task.family=embeddings", "task.embeddings.train=/shared/emb/train.npz"]
    with pytest.raises(ConfigError, match=r"task.embeddings.test: 'emb/test.npz' is relative and this cluster spans "
                                          r"machines \(1 x head .*, from aws.yaml\)"):
        check_shared_paths(load_config("tiny", overrides=[*off, *emb, "task.embeddings.test=emb/test.npz"]), runs, None, aws)
    with pytest.raises(ConfigError, match="task.image.root: 'data' is relative"):
        check_shared_paths(load_config("fashion-mnist-8x8", overrides=[*off, "task.image.root=data"]), runs, None, aws)
    accepted = [("tiny", [*emb, "task.embeddings.test=~/emb/test.npz"]), ("tiny", []),
                ("fashion-mnist-8x8", ["task.image.root=/shared/data"]),
                ("digits", ["task.image.root=data"])]  # digits ship inside scikit-learn: no root is read
    for preset, sets in accepted:
        check_shared_paths(load_config(preset, overrides=[*off, *sets]), runs, None, aws)
