"""Ray Tune sweeps: space files checked before any trial, a tiny sweep end to end on the shared local Ray
(nested MLflow runs, summary, a failing trial, --resume), and the MLflow UI driven by headless Chromium."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray import cloudpickle

from iai_dist import tune
from iai_dist.config import ConfigError
from iai_dist.search_space import load_space, trial_overrides
from iai_dist.sweep_report import TrialRow, best_trial, markdown_table, seed_table, write_csv

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hook below runs inside the trials

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "tune_spaces").glob("*.yaml"))
# the tiny preset on the service, sized so two trials fit the test session's 4 logical CPUs at once
TINY = {"preset": "tiny", "set": {
    "eval.one_step": False, "eval.monitor_episodes": 32, "train.max_steps": 20, "train.log_every": 5,
    "train.checkpoint_every": 10, "distributed.num_workers": 1, "distributed.episode_workers": 1,
    "distributed.learner_cpus": 0.5, "distributed.episode_worker_cpus": 0.5}}


def _space(tmp_path: Path, params: dict, **extra) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**TINY, "params": params, "early_stopping": None, **extra}))
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_spaces_are_valid(path):
    space, base = load_space(path)
    assert space.num_trials() >= 4 and base.distributed.num_workers >= 1


def test_shipped_signals_space_covers_every_regime_and_signal_it_allows():
    space, base = load_space(ROOT / "tune_spaces" / "signals.yaml")
    mixes = {(v["kind"], v["signal"]) for v in space.params["regime"].values}
    assert mixes == {(k, s) for k in ("parametric", "explicit") for s in ("obs", "grad", "obs+grad")} | {("implicit", "obs")}


def test_a_section_value_overrides_only_the_fields_it_names(tmp_path):
    space, base = load_space(_space(tmp_path, {"regime": {"grid": [{"kind": "explicit", "signal": "obs"}]}}))
    cfg = base.with_overrides(trial_overrides({"regime": {"kind": "explicit", "signal": "obs"}}))
    assert (cfg.regime.kind, cfg.regime.signal) == ("explicit", "obs")
    assert cfg.regime.chunk_size == base.regime.chunk_size == 8  # the tiny preset's, not the default 32


def test_a_space_file_takes_string_values_unquoted(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**TINY, "early_stopping": None}) + "params:\n  train.autocast: {grid: [off, bf16]}\n")
    space, base = load_space(path)
    assert space.params["train.autocast"].values == ("off", "bf16")


@pytest.mark.parametrize("params, extra, expected", [
    ({"task.stepz": {"grid": [1, 2]}}, {}, "params.task.stepz: unknown config key"),
    ({"task.steps": {"grid": [0, 2]}}, {}, "task.steps=0 is invalid: task.steps: Input should be greater than 0"),
    ({"regime": {"grid": [{"kind": "implicit", "signal": "grad"}]}}, {}, "needs parameters to differentiate"),
    ({"regime.kind": {"grid": ["implicit"]}, "regime.signal": {"grid": ["obs", "grad"]}}, {},
     "regime.kind='implicit', regime.signal='grad' is invalid"),
    ({"train.lr": {"between": [1, 2]}}, {}, "params.train.lr: expected one of {grid: [...]}, {choice"),
    ({"train.lr": {"uniform": [1e-2, 1e-3]}}, {}, "lo must be below hi"),
    ({"train.lr": {"loguniform": [0, 1e-3]}}, {}, "loguniform: lo must be positive"),
    ({"train.lr": {"grid": []}}, {}, "grid: expected a non-empty list"),
    ({"regime": {"uniform": [0, 1]}}, {}, "regime is a section"),
    ({"tracking.experiment": {"grid": ["a", "b"]}}, {}, "tracking settings belong to the sweep"),
    ({"train.lr": {"grid": [1e-3]}}, {"parms": {}}, "parms: unknown key"),
    ({"train.lr": {"grid": [1e-3]}}, {"set": {"distributed.num_workers": 0, "distributed.episode_workers": 0}},
     "base config has distributed.num_workers=0"),
    ({"train.lr": {"grid": [1e-3]}}, {"set": {"train.max_step": 5}}, "set: train.max_step: unknown key"),
])
def test_bad_space_files_are_refused_naming_the_file_and_key(tmp_path, params, extra, expected):
    path = _space(tmp_path, params)
    if extra:
        data = yaml.safe_load(path.read_text())
        data.update(extra)
        if "set" in extra:
            data["set"] = {**TINY["set"], **extra["set"]}
        path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        load_space(path)
    assert str(exc.value).startswith(str(path)) and expected in str(exc.value), str(exc.value)


def test_cli_refuses_a_bad_space_before_any_work(tmp_path, capsys):
    path = _space(tmp_path, {"task.steps": {"grid": [2, -1]}})
    runs = tmp_path / "runs"
    assert tune.main(["--space", str(path), "--set", f"tracking.runs_dir={runs}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: params: a trial with task.steps=-1 is invalid") and "Traceback" not in err
    assert not runs.exists()
    assert tune.main(["--space", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert tune.main(["--space", str(path), "--set", "train.lr=-1"]) == 2
    assert "error: --set: train.lr: Input should be greater than 0 (got -1)" in capsys.readouterr().err


def test_trials_at_once_counts_each_trials_learners_and_episode_workers(ray_local, tmp_path):
    from iai_dist.service.capacity import cluster_capacity
    from iai_dist.service.sweep import trials_at_once

    # the session's Ray has 4 CPUs; a tiny trial holds 1 (itself) + 0.5 (learner) + 0.5 per episode worker
    capacity = cluster_capacity()
    assert capacity.source.startswith("the nodes alive now") and capacity.hosts == 1
    space, base = load_space(_space(tmp_path, {"task.steps": {"grid": [1, 2, 3]}}))
    assert trials_at_once(base, space, None, capacity) == 2 and trials_at_once(base, space, 1, capacity) == 1
    space, base = load_space(_space(tmp_path, {"distributed.episode_workers": {"grid": [1, 3]}}))
    assert trials_at_once(base, space, None, capacity) == 1  # the 3-worker trials need 3 CPUs
    space, base = load_space(_space(tmp_path, {"distributed.episode_workers": {"grid": [1, 7]}}))
    with pytest.raises(ConfigError, match="one trial needs 9 bundles .* more than the cluster can scale to"):
        trials_at_once(base, space, None, capacity)  # 1 + 7 x 0.5 + 0.5 = 5 CPUs


def test_paper_sweep_on_the_aws_cluster_runs_as_many_trials_as_its_gpu_nodes_hold():
    """An autoscaling cluster starts with no GPU; concurrency comes from what its config lets it scale to."""
    from iai_dist.service.capacity import from_autoscaling_config
    from iai_dist.service.sweep import trials_at_once

    capacity = from_autoscaling_config(yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text()), "aws.yaml")
    assert capacity.hosts == 9  # the head and 8 g5.12xlarge
    space, base = load_space(ROOT / "tune_spaces" / "paper.yaml", None, ["distributed.use_gpu=true"])
    # a trial: 1 learner (1 GPU) + 2 episode workers (0.25 GPU each) = 1.5 GPUs; 8 nodes x 4 GPUs hold 21
    assert trials_at_once(base, space, None, capacity) == 21
    assert trials_at_once(base, space, 5, capacity) == 5
    # a learner sharing its card: 0.25 + 2 x 0.25 = 0.75 GPUs a trial, 5 a node: all 28 trials of the space at once
    shared = load_space(ROOT / "tune_spaces" / "paper.yaml", None,
                        ["distributed.use_gpu=true", "distributed.learner_gpus=0.25"])[1]
    assert space.num_trials() == 28 and trials_at_once(shared, space, None, capacity) == 28


def _fail_implicit(cfg) -> None:
    if cfg.regime.kind == "implicit":
        raise RuntimeError("injected trial failure")


@pytest.fixture(scope="module")
def sweep(ray_local, tmp_path_factory):
    """One tiny sweep shared by the tests below: 3 trials, of which the implicit one raises."""
    tmp = tmp_path_factory.mktemp("sweep")
    space = _space(tmp, {"regime": {"grid": [{"kind": "parametric", "signal": "obs"},
                                             {"kind": "parametric", "signal": "obs+grad"},
                                             {"kind": "implicit", "signal": "obs"}]}})
    runs = tmp / "runs"
    argv = ["--space", str(space), "--set", f"tracking.runs_dir={runs}", "--name", "tiny-sweep", "--trial-retries", "0",
            "--register", "tiny-best"]
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        code = tune.main(argv, on_trial=_fail_implicit)
    return {"code": code, "argv": argv, "runs": runs, "dir": runs / "tiny-sweep",
            "client": MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")}


def _runs(sweep):
    client = sweep["client"]
    experiment = client.get_experiment_by_name("iai_dist")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "tiny-sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


def test_tiny_sweep_lands_as_nested_runs_with_a_summary_and_survives_a_failing_trial(sweep):
    assert sweep["code"] == 1  # one trial failed: reported, and the others went on
    rows = list(csv.DictReader((sweep["dir"] / "summary.csv").open()))
    by_signal = {(r["regime.kind"], r["regime.signal"]): r for r in rows}
    assert len(rows) == 3
    failed = by_signal[("implicit", "obs")]
    assert failed["status"] == "failed" and "injected trial failure" in failed["failure"]
    for key in (("parametric", "obs"), ("parametric", "obs+grad")):
        row = by_signal[key]
        assert row["status"] == "finished" and row["error_source"] == "evaluation"
        errors = [float(row[f"error_step_{i}"]) for i in range(1, 7)]  # tiny: K = 3, evaluated to 2K
        assert float(row["error_at_K"]) == errors[2]
        if key[1] == "obs+grad":  # 20 learner steps: gradients refine; observations alone barely move (~99.8%)
            assert errors[2] < errors[1] < errors[0] < 90
        summary = json.loads((sweep["dir"] / "trials" / row["trial"] / "summary.json").read_text())
        assert summary["per_step"]["refiner"][1:] == pytest.approx(errors)

    parent, children = _runs(sweep)
    client = sweep["client"]
    assert len(children) == 3
    status = {c.data.params["regime.signal"] + "/" + c.data.params["regime.kind"]: c.info.status for c in children}
    assert status == {"obs/parametric": "FINISHED", "obs+grad/parametric": "FINISHED", "obs/implicit": "FAILED"}
    for child in children:
        if child.info.status != "FINISHED":
            continue
        history = client.get_metric_history(child.info.run_id, "train/heldout_error/step_3")
        assert [m.step for m in history] == [5, 10, 15, 20]  # every log step of the learner
        assert [m.step for m in client.get_metric_history(child.info.run_id, "eval/refiner/error")] == list(range(7))
        assert "system/cpu_utilization_percentage" in child.data.metrics
        assert child.data.params["task.steps"] == "3"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.md", "error_vs_step.png", "signals.png", "space.yaml", "best_trial"} <= artifacts
    best = {a.path for a in client.list_artifacts(parent.info.run_id, "best_trial")}
    assert best == {"best_trial/checkpoint.pt", "best_trial/config.yaml"}
    finished = [r for r in rows if r["status"] == "finished"]
    assert parent.data.metrics["sweep/best_error_at_K"] == pytest.approx(min(float(r["error_at_K"]) for r in finished))
    assert parent.data.params["sweep.regime"].startswith("grid [")
    best_row = min(finished, key=lambda r: float(r["error_at_K"]))
    assert client.get_model_version("tiny-best", "1").run_id == best_row["mlflow_run_id"]  # --register
    table = (sweep["dir"] / "summary.md").read_text()
    assert "| trial | status | kind | signal | K | step 1 | step 2 | step 3 | step 5 | step 6 |" in table  # and past K


def test_mlflow_ui_shows_the_sweep_and_a_child_metric_chart(sweep, tmp_path):
    """`make ui` on the sweep's store, read by headless Chromium: the parent run, its children once
    expanded, a child's held-out error chart and its error-vs-refinement-step chart, the registered model."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    parent, children = _runs(sweep)
    child = next(c for c in children if c.info.status == "FINISHED")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    ui = subprocess.Popen(["make", "-s", "-C", str(ROOT), "ui", f"RUNS={sweep['runs']}", f"UI_PORT={port}"],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(arg)
    options.binary_location = "/usr/bin/chromium"
    browser = None
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url, ui, 120)
        browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        page = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
        experiment = parent.info.experiment_id
        browser.get(f"{url}/#/experiments/{experiment}/runs")
        WebDriverWait(browser, 120).until(lambda _: "tiny-sweep" in page())
        assert not any(c.info.run_name in page() for c in children)  # nested: hidden until expanded
        browser.find_element(By.CSS_SELECTOR, 'button[data-component-id$="runnamecellrenderer.tsx_46"]').click()
        WebDriverWait(browser, 60).until(lambda _: all(c.info.run_name in page() for c in children))
        browser.save_screenshot(str(tmp_path / "sweep_runs.png"))

        browser.get(f"{url}/#/experiments/{experiment}/runs/{child.info.run_id}/model-metrics")
        search = WebDriverWait(browser, 120).until(
            lambda b: b.find_element(By.CSS_SELECTOR, 'input[placeholder="Search metric charts"]'))
        WebDriverWait(browser, 60).until(lambda _: "train/heldout_error" in page())
        search.send_keys("heldout_error/step_3", Keys.ENTER)
        legend = f"{child.info.run_name} (train/heldout_error/step_3)"  # the line's label under the chart
        WebDriverWait(browser, 60).until(lambda _: legend in page() and "eval/adam" not in page())
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".js-plotly-plot svg.main-svg"))
        lines = page().splitlines()
        assert "train/heldout_error" in lines and "Step" in lines  # the section and the chart's x axis
        assert {"5", "10", "15", "20"} <= set(lines)  # ticks at the learner's log steps
        shot = tmp_path / "child_metric_chart.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000

        search.send_keys(Keys.CONTROL, "a")  # a new search (clear() does not reach the page's own state)
        search.send_keys(Keys.BACKSPACE)
        WebDriverWait(browser, 60).until(lambda _: "eval/refiner" in page().splitlines())  # a chart section
        search.send_keys("eval/refiner/error", Keys.ENTER)  # the evaluation: one chart of error vs refinement step
        legend = f"{child.info.run_name} (eval/refiner/error)"
        WebDriverWait(browser, 60).until(lambda _: legend in page() and "train/heldout_error" not in page())
        assert {"0", "2", "4", "6", "Step"} <= set(page().splitlines())  # x axis: refinement steps 0 .. 2K
        browser.save_screenshot(str(tmp_path / "child_error_vs_step.png"))

        browser.get(f"{url}/#/models/tiny-best")  # the registry page of the best trial's model (--register)
        WebDriverWait(browser, 60).until(lambda _: "tiny-best" in page() and "Version 1" in page())
    finally:
        if browser is not None:
            browser.quit()
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(30)


def test_resume_retries_the_failed_trial_and_keeps_the_finished_ones(sweep):
    finished_before = {c.info.run_id: c.info.end_time for c in _runs(sweep)[1] if c.info.status == "FINISHED"}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert tune.main([*sweep["argv"], "--resume"]) == 0  # no failure injected this time
    rows = list(csv.DictReader((sweep["dir"] / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["finished"] * 3
    parent, children = _runs(sweep)
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)  # the same child runs
    assert {c.info.run_id: c.info.end_time for c in children if c.info.run_id in finished_before} == finished_before


def test_resume_refuses_a_changed_space_or_config(sweep, capsys):
    assert tune.main([*sweep["argv"], "--resume", "--set", "train.lr=0.01"]) == 2
    assert "was started with another base config (train.lr: 0.003 then, 0.01 now)" in capsys.readouterr().err
    assert tune.main(sweep["argv"]) == 2
    assert "already exists" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "make ui exited"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the MLflow UI did not answer on {url} within {timeout:.0f} s")


def test_a_sweep_over_seeds_reports_mean_and_spread_per_setting():
    def row(trial, seed, signal, errors, status="finished"):
        return TrialRow(trial, status, {"regime.signal": signal, "train.seed": seed}, 2, ("parametric", signal), 10,
                        errors, "evaluation", None, Path("."), None)

    rows = [row("a", 0, "obs", [50.0, 4.0]), row("b", 1, "obs", [54.0, 6.0]), row("c", 2, "obs", [52.0, 5.0]),
            row("d", 0, "grad", [60.0, 9.0]), row("e", 1, "grad", [70.0, 11.0]),
            row("f", 2, "grad", [99.0], status="stopped early")]
    table = seed_table(rows, "error %")
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0] == "| signal | K | seeds | step 1 | step 2 |"
    assert lines[1] == "| obs | 2 | 3 | 52.0 +- 2 | 5 +- 1 |"  # best first; sample sd
    assert lines[2] == "| grad | 2 | 2 | 65.0 +- 7.07 | 10.0 +- 1.41 |"  # the stopped trial is not averaged
    assert table in markdown_table(rows, "error %")
    assert seed_table([r for r in rows if r.params["train.seed"] == 0], "error %") == ""  # one seed: no table
    longer = [TrialRow(f"k{seed}", "finished", {"task.steps": 5, "train.seed": seed}, 5, ("parametric", "obs"), 10,
                       [50.0, 20.0, 10.0, 5.0, 1.0 + seed], "evaluation", None, Path("."), None) for seed in (0, 1)]
    assert "| 5 | 2 | 50.0 +- 0 | 20.0 +- 0 | 1.5 +- 0.707 |" in seed_table(longer + rows, "error %")  # K=2 rows: no step 5


def test_tables_go_past_k_and_rank_by_the_error_after_step_k(tmp_path):
    """Trials evaluated past K (eval.horizon) or trained past it (train.horizon, the monitor) report those steps
    in the table and the CSV; they are still ranked by the error after step K."""
    def row(trial, horizon, errors):
        return TrialRow(trial, "finished", {"train.horizon": horizon}, 2, ("parametric", "obs"), 10, errors,
                        "evaluation", None, Path("."), None)

    rows = [row("b", 2, [55.0, 5.0, 2.0, 1.0]), row("a", 1, [50.0, 4.0, 9.0, 30.0]), row("c", 1, [60.0])]
    assert [r.final for r in rows] == [5.0, 4.0, None] and best_trial(rows).trial == "a"
    lines = [line for line in markdown_table(rows, "error %").splitlines() if line.startswith("| ")]
    assert lines[0] == "| trial | status | horizon | K | step 1 | step 2 | step 4 |"
    assert lines[1:] == ["| a | finished | 1 | 2 | 50.0 | 4 | 30.0 |", "| b | finished | 2 | 2 | 55.0 | 5 | 1 |",
                         "| c | finished | 1 | 2 | 60.0 |  |  |"]
    written = list(csv.DictReader(write_csv(rows, tmp_path / "summary.csv").open()))
    assert [(r["trial"], r["error_at_K"], r["error_step_4"]) for r in written] == [
        ("a", "4.0", "30.0"), ("b", "5.0", "1.0"), ("c", "", "")]
    # a key only later trials set (tune_spaces/horizon.yaml's horizon_from) still comes before the seed
    seeded = [row("d", 1, [50.0, 4.0]), row("e", 2, [50.0, 4.0])]
    seeded[0].params.update({"train.seed": 0})
    seeded[1].params.update({"train.seed": 0, "train.horizon_from": 0.75})
    assert "| trial | status | horizon | horizon_from | seed | K |" in markdown_table(seeded, "error %")


def test_generative_trials_are_ranked_by_their_samples_sliced_w2():
    """The flow-matching loss is a proxy: where trials carry the samples' sliced W2 (generative families), the
    table shows it and ranks and picks the best by it."""
    def row(trial, loss, sw2, status="finished"):
        return TrialRow(trial, status, {"regime.signal": trial}, 2, ("parametric", trial), 10, [90.0, loss],
                        "evaluation", None, Path("."), None, sw2)

    rows = [row("obs", 40.0, 0.31), row("grad", 35.0, 0.45), row("obs+grad", 38.0, None, status="stopped early")]
    assert best_trial(rows).trial == "obs"  # not 'grad', whose flow-matching loss is lower
    lines = [line for line in markdown_table(rows, "error %").splitlines() if line.startswith("| ")]
    assert lines[0].endswith("| step 1 | step 2 | sliced W2 at K |")
    assert [line.split(" | ")[0] for line in lines[1:]] == ["| obs", "| grad", "| obs+grad"]
    assert lines[1].endswith("| 0.31 |") and lines[3].endswith("|  |")

