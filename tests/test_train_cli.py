"""The main job end to end, in process: train, one-step model, evaluation, MLflow run, resume, evaluate CLI."""

import contextlib
import io
import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from iai_dist import evaluate, train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One real training run shared by this module's tests (none of them changes what it wrote)."""
    root = tmp_path_factory.mktemp("train_cli")
    argv = ["--preset", "tiny", "--set", "tracking.run_name=t1", "--set", "train.max_steps=30",
            "--set", f"tracking.runs_dir={root / 'runs'}"]
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
    assert mrun.data.metrics["eval/refiner/step_3"] == pytest.approx(summary["per_step"]["refiner"][3])
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
