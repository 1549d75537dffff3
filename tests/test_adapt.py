"""The trained refiner as scikit-learn estimators: the same states as the rollout, streaming, bad input, the command."""

import csv
import json
from collections import Counter

import mlflow
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import check_get_params_invariance, check_set_params

from iai_dist import adapt, adapt_command
from iai_dist.adapt import AmortizedClassifier, AmortizedRegressor
from iai_dist.bench_adapt import METHODS
from iai_dist.learner import train_in_process
from iai_dist.rollout import refine


def _train(cfg, path, steps):
    cfg = cfg.with_overrides({"train.max_steps": steps, "task.steps": 5})
    train_in_process(cfg, path, progress=False)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny refiners, trained for a few seconds each: parametric linear regression, parametric linear
    classification (3 classes), implicit regression."""
    from iai_dist.config import load_config

    root = tmp_path_factory.mktemp("refiners")
    base = load_config("tiny", overrides=["tracking.enabled=false", "eval.one_step=false"])
    torch.set_num_threads(2)
    return {
        "regression": _train(base, root / "reg.pt", 120),
        "classification": _train(base.with_overrides({"task.family": "linear_classification", "task.num_classes": 3}),
                                 root / "cls.pt", 60),
        "implicit": _train(base.with_overrides({"regime.kind": "implicit", "regime.signal": "obs"}), root / "imp.pt", 10),
    }


def _episode(est, index=0):
    """One held-out task of the family the estimator's refiner was trained on, K = 5 mini-batches."""
    return est.refiner_.family.sample(est.config_.eval.seed, torch.tensor([index]))


def _rollout_outputs(model, ep):
    """f's outputs at the episode's query points after its K refinement steps, by the model's own step."""
    state = model.initial_state(ep.x_query)
    with torch.no_grad():
        for i in range(ep.num_batches):
            x, y = ep.minibatch(i)
            state = model.step(state, x, y, model.signal(state, x, y), torch.tensor([i]), ep.x_query)
        return model.predict(state, ep.x_query)[0]


def _stream_minibatches(est, ep, labels=None):
    for i in range(ep.num_batches):
        x, y = ep.minibatch(i)
        if labels is None:
            est.partial_fit(x[0].numpy(), y[0].numpy())
        else:  # every label declared up front, as scikit-learn's partial_fit asks
            est.partial_fit(x[0].numpy(), labels[y[0].numpy()], classes=labels)


@pytest.mark.parametrize("kind", ["regression", "implicit"])
def test_the_estimator_reaches_the_rollouts_predictions(trained, kind):
    """Mini-batch by mini-batch, the estimator's predictions are the refinement's at every step count."""
    est = AmortizedRegressor(model=trained[kind], random_state=0)
    est.partial_fit(np.zeros((1, 4)), [0.0])  # loads the refiner; replaced below
    ep = _episode(est)
    est = clone(est)
    _stream_minibatches(est, ep)
    assert est.n_steps_ == 5
    model = est.refiner_
    expected = _rollout_outputs(model, ep)[:, 0].numpy()
    torch.testing.assert_close(torch.from_numpy(est.predict(ep.x_query[0].numpy())).float(),
                               torch.from_numpy(expected), rtol=1e-4, atol=1e-5)
    # and the error after step K is the one evaluation reports for this episode
    num, den = refine(model, ep)[-1]
    assert float(((est.predict(ep.x_query[0].numpy()) - ep.y_query[0].numpy()) ** 2).sum() / den) == pytest.approx(
        float(num / den), rel=1e-3)


def test_fit_streams_to_the_horizon_or_max_steps_and_refines(trained):
    """By default one pass, at most the horizon (K=5 x eval.horizon 2 here), saying what it left unread; more
    steps only when asked for, with a warning as they pass the horizon; full mini-batches of B throughout."""
    ep_est = AmortizedRegressor(model=trained["regression"]).partial_fit(np.zeros((1, 4)), [0.0])
    ep = ep_est.refiner_.family.sample(7, torch.tensor([3]), num_batches=50)  # 200 points of one task
    x, y = ep.context()
    x, y, xq, yq = x[0].numpy(), y[0].numpy(), ep.x_query[0].numpy(), ep.y_query[0].numpy()
    first = AmortizedRegressor(model=trained["regression"], max_steps=1, random_state=0).fit(x, y)
    five = AmortizedRegressor(model=trained["regression"], max_steps=5, random_state=0).fit(x, y)
    with pytest.warns(adapt.HorizonWarning, match="fit read 40 of 200 points: 10 mini-batches of 4"):
        default = AmortizedRegressor(model=trained["regression"], random_state=0).fit(x, y)
    with pytest.warns(adapt.HorizonWarning, match="refining to step 50, past this refiner's horizon of 10 steps"):
        one_pass = AmortizedRegressor(model=trained["regression"], max_steps=50, random_state=0).fit(x, y)
    assert (first.n_steps_, five.n_steps_, default.n_steps_, one_pass.n_steps_) == (1, 5, 10, 50)
    assert five.score(xq, yq) > first.score(xq, yq)  # R^2 on the task's query points: more data, better
    # a pass of 7 points is topped up from the next: every mini-batch has B distinct points, and 7 steps (4
    # shuffles) show each point 4 times
    seen = []
    est = AmortizedRegressor(model=trained["regression"], max_steps=7, random_state=0)
    est._step = lambda state, xb, yb, i, q: seen.append(xb[0]) or state
    est.fit(x[:7], y[:7])
    batches = [[tuple(p) for p in b.tolist()] for b in seen]
    assert all(len(set(b)) == 4 for b in batches)
    assert sorted(Counter(p for b in batches for p in b).values()) == [4] * 7
    again = AmortizedRegressor(model=trained["regression"], max_steps=5, random_state=0).fit(x, y)
    np.testing.assert_array_equal(again.predict(xq), five.predict(xq))  # random_state fixes the mini-batches
    # a parametric linear refiner's state is a linear model: coef_ and intercept_ are it
    np.testing.assert_allclose(five.predict(xq), xq @ five.coef_ + five.intercept_, rtol=1e-4, atol=1e-5)
    with pytest.raises(AttributeError, match="only a parametric refiner with a linear f"):
        AmortizedRegressor(model=trained["implicit"], max_steps=5).fit(x, y).coef_


def test_standardize_maps_the_data_onto_the_familys_scale_and_back(trained):
    """With standardize, new units for X and y change only the units of the answer (the refiner reads the same
    standardised data), coef_ and intercept_ are on the data's scale, and the fit beats one on the raw units."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=4)
    x, xq = rng.normal(size=(40, 4)), rng.normal(size=(50, 4))
    on_scale = AmortizedRegressor(model=trained["regression"], standardize=True, random_state=0).fit(x, x @ w)
    units = AmortizedRegressor(model=trained["regression"], standardize=True, random_state=0)
    units.fit(x * 10 + 5, x @ w * 100 - 30)
    np.testing.assert_allclose(units.predict(xq * 10 + 5), on_scale.predict(xq) * 100 - 30, rtol=1e-3, atol=0.05)
    np.testing.assert_allclose(units.predict(xq * 10 + 5), (xq * 10 + 5) @ units.coef_ + units.intercept_,
                               rtol=1e-4, atol=0.05)
    raw = AmortizedRegressor(model=trained["regression"], random_state=0).fit(x * 10 + 5, x @ w * 100 - 30)
    assert units.score(xq * 10 + 5, xq @ w * 100 - 30) > raw.score(xq * 10 + 5, xq @ w * 100 - 30)
    labels = (x @ w > 0).astype(int)
    a = AmortizedClassifier(model=trained["classification"], standardize=True, random_state=0).fit(x, labels)
    b = AmortizedClassifier(model=trained["classification"], standardize=True, random_state=0).fit(x * 10 + 5, labels)
    np.testing.assert_allclose(b.predict_proba(xq * 10 + 5), a.predict_proba(xq), atol=1e-3)


def test_the_classifier_maps_its_labels_and_matches_the_rollout(trained):
    est = AmortizedClassifier(model=trained["classification"]).partial_fit(np.zeros((3, 4)), ["a", "b", "c"])
    ep = _episode(est, 5)
    labels = np.array(["cat", "dog", "emu"])  # sorted: label i is the refiner's class i
    est = clone(est)
    _stream_minibatches(est, ep, labels)
    assert list(est.classes_) == list(labels) and est.n_steps_ == 5
    xq = ep.x_query[0].numpy()
    proba = est.predict_proba(xq)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-9)
    model = est.refiner_
    logits = _rollout_outputs(model, ep)
    np.testing.assert_allclose(proba, logits.double().softmax(-1).numpy(), rtol=1e-4, atol=1e-6)
    assert list(est.predict(xq)) == list(labels[proba.argmax(1)])
    truth = labels[ep.y_query[0].numpy()]
    assert est.score(xq, truth) == pytest.approx(float((labels[logits.argmax(1).numpy()] == truth).mean()))
    assert est.score(xq, truth) > 0.5  # 3 classes: a trained refiner after 5 mini-batches beats chance by far


def test_scikit_learn_conventions(trained):
    est = AmortizedRegressor(model=str(trained["regression"]), max_steps=3, random_state=1)
    check_get_params_invariance("AmortizedRegressor", est)
    check_set_params("AmortizedRegressor", est)
    cloned = clone(est)
    assert cloned.get_params() == est.get_params() and not hasattr(cloned, "refiner_")
    with pytest.raises(NotFittedError):
        est.predict(np.zeros((2, 4)))
    x, y = np.random.default_rng(0).normal(size=(12, 4)), np.arange(12.0)
    assert est.fit(x, y) is est and est.partial_fit(x, y) is est
    assert est.n_features_in_ == 4 and est.n_steps_ == 3 + 3


@pytest.mark.parametrize("X,y,message", [
    (np.zeros((8, 5)), np.zeros(8), "X has 5 features, but this refiner was trained with task.dim=4"),
    (np.zeros(8), np.zeros(8), "X: expected a 2-D array (samples x features), got 1-D"),
    (np.zeros((0, 4)), np.zeros(0), "X: expected at least one sample"),
    (np.full((8, 4), np.nan), np.zeros(8), "X contains NaN or infinity (first at row 0)"),
    (np.r_[np.zeros((3, 4)), np.full((5, 4), 1e39)], np.zeros(8), "X contains values beyond float32's range (first "
                                                                   "at row 3)"),
    (np.zeros((8, 4)) + 1j, np.zeros(8), "X: expected real numbers, got dtype complex128"),
    (np.zeros((8, 4)), np.r_[np.zeros(7), np.inf], "y contains NaN or infinity (first at index 7)"),
    (np.zeros((8, 4)), np.zeros(7), "y: expected a 1-D array of 8 targets"),
])
def test_bad_input_is_one_line_and_changes_nothing(trained, X, y, message):
    est = AmortizedRegressor(model=trained["regression"], random_state=0).fit(np.ones((8, 4)), np.ones(8))
    before, steps = est.predict(np.ones((3, 4))), est.n_steps_
    for call in (est.partial_fit, est.fit):
        with pytest.raises(ValueError) as info:
            call(X, y)
        assert str(info.value).startswith(message) and "\n" not in str(info.value)
        assert est.n_steps_ == steps
        np.testing.assert_array_equal(est.predict(np.ones((3, 4))), before)


def test_bad_labels_and_models(trained, tmp_path):
    est = AmortizedClassifier(model=trained["classification"]).fit(np.zeros((4, 4)), [0, 1, 1, 0])
    with pytest.raises(ValueError, match=r"^y has labels \[7\] not among classes_ \[0, 1\]$"):
        est.partial_fit(np.zeros((2, 4)), [0, 7])
    with pytest.raises(ValueError, match=r"^y has 4 classes \(\[0, 1, 2, 3\]\), but this refiner was trained on "
                                         r"task.num_classes=3$"):
        AmortizedClassifier(model=trained["classification"]).fit(np.zeros((4, 4)), [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"^y has a single class \(\[1\]\); a classifier needs at least 2"):
        AmortizedClassifier(model=trained["classification"]).fit(np.zeros((4, 4)), [1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"^y: expected labels of one sortable type .*, got \['NoneType', 'int'\]$"):
        AmortizedClassifier(model=trained["classification"]).fit(np.zeros((4, 4)), [0, None, 1, 0])
    with pytest.raises(ValueError, match=r"^max_steps: expected a positive integer or None, got True$"):
        AmortizedClassifier(model=trained["classification"], max_steps=True).fit(np.zeros((4, 4)), [0, 1, 1, 0])
    with pytest.raises(ValueError, match="a classification family: use AmortizedClassifier"):
        AmortizedRegressor(model=trained["classification"]).fit(np.zeros((4, 4)), np.zeros(4))
    with pytest.raises(ValueError, match="model: checkpoint .*missing.pt' does not exist"):
        AmortizedRegressor(model=tmp_path / "missing.pt").fit(np.zeros((4, 4)), np.zeros(4))


def test_a_model_from_an_mlflow_run(trained, tmp_path, monkeypatch):
    """`runs:/RUN_ID`: the checkpoint.pt artifact a training run logs, from the project's store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the store runs:/ URIs are read from
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("adapt", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifact(run.info.run_id, str(trained["regression"]))
    client.set_terminated(run.info.run_id)
    x, y = np.random.default_rng(1).normal(size=(20, 4)), np.random.default_rng(2).normal(size=20)
    from_run = AmortizedRegressor(model=f"runs:/{run.info.run_id}/reg.pt", random_state=0).fit(x, y)
    from_file = AmortizedRegressor(model=trained["regression"], random_state=0).fit(x, y)
    np.testing.assert_array_equal(from_run.predict(x), from_file.predict(x))
    with pytest.raises(ValueError, match=r"^model: runs:/0123456789abcdef: could not be downloaded"):
        AmortizedRegressor(model="runs:/0123456789abcdef").fit(x, y)


def _write_csv(path, header, rows):
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def test_the_adapt_command(trained, tmp_path, capsys):
    rng = np.random.default_rng(3)
    x, y, xq = rng.normal(size=(40, 4)), rng.normal(size=40), rng.normal(size=(6, 4))
    features = ["a", "b", "c", "d"]
    _write_csv(tmp_path / "train.csv", [*features, "y"], np.c_[x, y].tolist())
    _write_csv(tmp_path / "query.csv", features, xq.tolist())
    argv = ["--model", str(trained["regression"]), "--train", str(tmp_path / "train.csv"),
            "--predict", str(tmp_path / "query.csv"), "--out", str(tmp_path / "pred.csv"), "--seed", "4"]
    assert adapt_command.main(argv) == 0
    assert "6 predictions (10 refinement steps on 40 points)" in capsys.readouterr().err
    written = [float(v) for v in (tmp_path / "pred.csv").read_text().split()[1:]]
    expected = AmortizedRegressor(model=trained["regression"], random_state=4).fit(x, y).predict(xq)
    np.testing.assert_allclose(written, expected, rtol=1e-6)

    _write_csv(tmp_path / "query.csv", ["a", "b", "c", "e"], xq.tolist())
    assert adapt_command.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "expected the feature columns of" in err and len(err.splitlines()) == 1
    assert adapt_command.main([*argv[:4], "--predict", str(tmp_path / "none.csv")]) == 2
    assert "none.csv: no such file" in capsys.readouterr().err



def test_the_adapt_bench_streams_every_method(trained, tmp_path):
    """The command (a fresh process per method: regression), and each classification method in this process."""
    from iai_dist import bench
    from iai_dist.bench_adapt import run_one

    bench.main(["adapt", "--model", str(trained["regression"]), "--points", "600", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "adapt.json").read_text())["rows"]
    rows += [{"kind": "classification", **run_one(m, 600, str(trained["classification"]), 0)}
             for m in METHODS["classification"]]
    assert [(r["kind"], r["method"]) for r in rows] == [(k, m) for k in METHODS for m in METHODS[k]]
    for r in rows:
        assert r["read"] == (20 if "first K" in r["method"] else 600)  # tiny: K = 5 mini-batches of B = 4
        assert r["points_per_s"] > 0 and r["peak_rss_mb"] >= r["rss_after_load_mb"] > 0
    by = {(r["kind"], r["method"]): r["error"] for r in rows}
    assert by["regression", "Ridge (all at once)"] < 5  # 600 noisy points pin a 4-d linear model down
    assert by["classification", "refiner, first K mini-batches"] < 60  # 3 classes: chance is ~67%
    assert "| regression | refiner | 600 | 600 |" in (tmp_path / "adapt.md").read_text()
    with pytest.raises(SystemExit, match="--model .*cls.pt is a linear_classification refiner; expected a "
                                         "linear_regression one"):
        bench.main(["adapt", "--model", str(trained["classification"]), "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
