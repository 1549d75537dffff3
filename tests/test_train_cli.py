"""The main job end to end, in process: train, one-step model, evaluation, MLflow run, resume, evaluate CLI."""

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from iai_dist import evaluate, train
from iai_dist.adapt import AmortizedRegressor
from iai_dist.config import load_config
from iai_dist.mlflow_model import input_example
from iai_dist.service.loopback import free_port


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One real training run shared by this module's tests (none of them changes what it wrote)."""
    root = tmp_path_factory.mktemp("train_cli")
    argv = ["--preset", "tiny", "--set", "tracking.run_name=t1", "--set", "train.max_steps=30",
            "--set", f"tracking.runs_dir={root / 'runs'}", "--set", "tracking.register=tiny-refiner"]
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert train.main(argv) == 0
    return root / "runs" / "t1", argv, out.getvalue()


def test_train_writes_summary_checkpoint_and_mlflow_run(run):
    run_dir, _, out = run
    assert "step     30/30" in out and "| refiner |" in out and "mlflow ui --backend-store-uri sqlite:////" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    k = summary["K"]
    assert len(summary["per_step"]["refiner"]) == 2 * k + 1
    assert set(summary["per_step"]) == {"refiner", "bayes_optimal", "adam", "sgd"}
    assert set(summary["at_once"]) == {"full_fit", "one_step"}
    assert summary["per_step"]["bayes_optimal"][k] < summary["per_step"]["bayes_optimal"][1]
    for name in ("checkpoint.pt", "one_step/checkpoint.pt", "config.yaml", "error_vs_step.png"):
        assert (run_dir / name).stat().st_size > 0, name

    mlflow.set_tracking_uri(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    client = MlflowClient()
    mrun = client.get_run((run_dir / "mlflow_run_id").read_text())
    assert mrun.info.status == "FINISHED"
    assert mrun.data.params["task.family"] == "linear_regression"
    tags = mrun.data.tags  # what a reviewer filters by
    assert {k: tags[k] for k in ("preset", "task.family", "regime.kind", "regime.signal", "K", "B", "cluster")} == {
        "preset": "tiny", "task.family": "linear_regression", "regime.kind": "parametric", "regime.signal": "obs+grad",
        "K": "3", "B": "4", "cluster": "in process"}
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", tags["git_commit"])  # the tests run from a git checkout
    curve = client.get_metric_history(mrun.info.run_id, "eval/refiner/error")  # error vs refinement step
    assert [m.step for m in curve] == list(range(len(summary["per_step"]["refiner"])))
    assert [m.value for m in curve] == pytest.approx(summary["per_step"]["refiner"])
    history = client.get_metric_history(mrun.info.run_id, "train/loss")
    assert [m.step for m in history] == [10, 20, 30]
    assert mrun.info.artifact_uri.startswith((run_dir.parent / "mlartifacts").as_uri())
    artifacts = {a.path for a in client.list_artifacts(mrun.info.run_id)}
    assert {"summary.json", "config.yaml", "error_vs_step.png", "checkpoint.pt"} <= artifacts


def test_rerun_with_the_same_name_resumes_and_a_changed_config_is_refused(run, capsys):
    run_dir, argv, _ = run
    run_id = (run_dir / "mlflow_run_id").read_text()
    before = (run_dir / "checkpoint.pt").read_bytes()
    assert train.main(argv) == 0
    assert (run_dir / "mlflow_run_id").read_text() == run_id
    assert "[refiner] step" not in capsys.readouterr().out
    assert (run_dir / "checkpoint.pt").read_bytes() == before  # nothing left to train: untouched
    assert train.main(argv + ["--set", "train.lr=0.5"]) == 2
    assert "train.lr cannot change on resume" in capsys.readouterr().err
    assert (run_dir / "checkpoint.pt").read_bytes() == before


def test_evaluate_command_reproduces_the_summary_and_crosses_families(run, tmp_path):
    run_dir, _, _ = run
    trained = json.loads((run_dir / "summary.json").read_text())
    assert evaluate.main(["--checkpoint", str(run_dir / "checkpoint.pt"), "--out", str(tmp_path / "e1")]) == 0
    again = json.loads((tmp_path / "e1" / "summary.json").read_text())
    assert again["per_step"]["refiner"] == pytest.approx(trained["per_step"]["refiner"])
    assert again["at_once"]["one_step"] == pytest.approx(trained["at_once"]["one_step"])
    assert evaluate.main(["--checkpoint", str(run_dir / "checkpoint.pt"), "--set", "task.family=mlp_regression",
                          "--out", str(tmp_path / "e2")]) == 0
    other = json.loads((tmp_path / "e2" / "summary.json").read_text())
    assert other["task"]["family"] == "mlp_regression" and "bayes_optimal" not in other["per_step"]


def test_evaluate_rejects_a_checkpoint_that_does_not_fit(run, tmp_path, capsys):
    run_dir, _, _ = run
    assert evaluate.main(["--checkpoint", str(run_dir / "checkpoint.pt"), "--set", "task.dim=9"]) == 2
    assert "does not fit task" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_text("garbage")
    assert evaluate.main(["--checkpoint", str(bad)]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_the_run_registers_a_pyfunc_model_that_loads_elsewhere_and_serves_over_http(run, tmp_path):
    """`--set tracking.register=NAME`: the run's refiner is an MLflow model in the registry; a fresh process in
    another directory loads it with mlflow.pyfunc, and `mlflow models serve` answers a real HTTP request; both
    give the in-process estimator's numbers."""
    run_dir = run[0]
    uri = f"sqlite:///{run_dir.parent / 'mlflow.db'}"
    version = MlflowClient(uri).get_model_version("tiny-refiner", "1")
    assert version.run_id == (run_dir / "mlflow_run_id").read_text()

    frame = input_example(load_config("tiny"))  # the logged input example: context rows, then query rows
    context, query = frame[frame.role == "context"], frame[frame.role == "query"]
    features = [f"x{i}" for i in range(4)]
    expected = AmortizedRegressor(model=run_dir, random_state=0).fit(
        context[features].to_numpy(), context["y"].to_numpy()).predict(query[features].to_numpy())

    frame.to_json(tmp_path / "frame.json", orient="split")
    script = ("import mlflow, pandas as pd, json\n"
              "m = mlflow.pyfunc.load_model('models:/tiny-refiner/1')\n"
              "out = m.predict(pd.read_json('frame.json', orient='split'))\n"
              "print(json.dumps(out['prediction'].tolist()))\n")
    # as from an activated venv (the server runs uvicorn from PATH), in a directory outside the checkout
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    loaded = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    np.testing.assert_allclose(json.loads(loaded.stdout.strip().splitlines()[-1]), expected, rtol=1e-5)

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                               "models:/tiny-refiner/1", "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              cwd=tmp_path, env=env, stdout=(tmp_path / "serve.log").open("w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                time.sleep(0.5)
        body = json.dumps({"dataframe_split": json.loads(frame.to_json(orient="split", index=False)),
                           "params": {"random_state": 0}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = [row["prediction"] for row in json.loads(response.read())["predictions"]]
        np.testing.assert_allclose(served, expected, rtol=1e-5)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
