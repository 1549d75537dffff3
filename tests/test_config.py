"""Every class of bad input fails before any work: one readable line, exit code 2, nothing written."""

import os
import subprocess
import sys

import pytest

from iai_dist.config import ConfigError, load_config, preset_names
from iai_dist.train import main


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_validates(name):
    cfg = load_config(name)
    assert cfg.task.steps >= 1
    with pytest.raises(Exception):
        cfg.task.dim = 3  # frozen


def test_overrides_are_typed_and_layered(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("task:\n  dim: 7\ntrain:\n  lr: 0.01\n")
    cfg = load_config("tiny", user, ["train.lr=3e-4", "regime.signal=grad", "eval.lr_grid=[0.1, 1]"])
    assert cfg.task.dim == 7 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.regime.signal == "grad" and cfg.eval.lr_grid == (0.1, 1.0)
    assert cfg.task.steps == load_config("tiny").task.steps  # the preset under the file is kept


BAD = [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--set", "task.family=quadratic"], "task.family: unknown task family 'quadratic'"),
    (["--set", "regime.kind=magic"], "regime.kind: Input should be 'parametric', 'explicit' or 'implicit'"),
    (["--set", "train.lrr=1"], "train.lrr: unknown key"),
    (["--set", "nosection.x=1"], "nosection: unknown key"),
    (["--set", "task.dim=-3"], "task.dim: Input should be greater than 0 (got -3)"),
    (["--set", "task.batch_size=0"], "task.batch_size: Input should be greater than 0"),
    (["--set", "train.tasks_per_batch=0"], "train.tasks_per_batch: Input should be greater than 0"),
    (["--set", "regime.kind=implicit", "--set", "regime.signal=grad"], "the implicit regime has none, use 'obs'"),
    (["--set", "refiner.width=30", "--set", "refiner.heads=4"], "width 30 must be a multiple of heads 4"),
    (["--set", "distributed.num_workers=2", "--set", "distributed.episode_workers=1"],
     "distributed.episode_workers (1) must be at least distributed.num_workers (2)"),
    (["--set", "distributed.num_workers=0", "--set", "distributed.episode_workers=2"],
     "distributed.episode_workers needs distributed.num_workers > 0"),
    (["--set", "distributed.num_workers=3", "--set", "distributed.episode_workers=3"],
     "train.tasks_per_batch (32) must be a multiple of distributed.num_workers (3)"),
    (["--set", "distributed.staleness=-1"], "distributed.staleness: Input should be greater than or equal to 0"),
    (["--set", "train.autocast=fp16"], "train.autocast: Input should be 'auto', 'off' or 'bf16' (got 'fp16')"),
    (["--set", "distributed.episode_worker_gpus=1.5"], "distributed.episode_worker_gpus: Input should be less than or equal to 1"),
    (["--set", "distributed.use_gpu=true", "--set", "distributed.num_workers=2", "--set", "distributed.episode_workers=2",
      "--set", "distributed.learner_gpus=0.5"], "distributed.learner_gpus 0.5 with distributed.num_workers 2"),
    (["--set", "train.compile=yes"], "train.compile: Input should be 'off', 'refiner', 'step' or 'graphs' (got 'yes')"),
    (["--set", "distributed.num_workers=2", "--set", "distributed.episode_workers=2", "--set", "train.compile=graphs"],
     "train.compile 'graphs': CUDA graphs cannot hold DDP's gradient all-reduce"),
    (["--set", "train.horizon_from=0.5"], "train.horizon_from: a curriculum into a horizon past K; set train.horizon >= 2"),
    (["--set", "train.horizon=2", "--set", "train.horizon_from=1"], "train.horizon_from: Input should be less than 1"),
    (["--set", "train.horizon_weight=0.5"], "train.horizon_weight: the weight of the steps past K; set train.horizon >= 2"),
    (["--set", "train.lr"], "expected KEY=VALUE"),
    (["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
]


def test_every_documented_value_is_taken_unquoted():
    """YAML 1.1 would read off/on/yes/no as booleans and 2024 as a number; string fields take them as written."""
    cfg = load_config("tiny", overrides=["train.autocast=off", "tracking.run_name=2024", "regime.kind=explicit",
                                         "eval.one_step=no", "train.compile=off", "train.device=cpu"])
    assert (cfg.train.autocast, cfg.tracking.run_name, cfg.eval.one_step, cfg.train.compile) == ("off", "2024", False, "off")
    assert load_config("tiny", overrides=["tracking.run_name=null"]).tracking.run_name is None


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_config_is_one_clear_line_and_writes_nothing(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--preset", "tiny", *argv] if "--preset" not in argv and "--config" not in argv else argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_broken_yaml_names_the_file_and_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.yaml").write_text("task:\n  dim: 3\n  steps: [1, 2\n")
    assert main(["--config", "broken.yaml"]) == 2
    err = capsys.readouterr().err
    assert "broken.yaml: line" in err and "not valid YAML" in err
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert main(["--config", "list.yaml"]) == 2
    assert "expected a mapping" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml", "list.yaml"]


def test_command_line_exits_2_without_a_traceback(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    proc = subprocess.run([sys.executable, "-m", "iai_dist.train", "--set", "task.query_size=-1"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: --set: task.query_size: Input should be greater than 0 (got -1)"
    assert list(tmp_path.iterdir()) == []


def test_config_error_is_a_value_error():
    with pytest.raises(ConfigError):
        load_config("tiny", overrides=["task.steps=0"])
