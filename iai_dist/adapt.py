"""Use a trained refiner: scikit-learn estimators that adapt to a data set one mini-batch at a time.

    AmortizedRegressor(model="runs/NAME").fit(X, y).predict(X_new)
    python -m iai_dist.adapt --model runs/NAME --train train.csv --predict query.csv [--out preds.csv]

`fit` streams (X, y) through the refiner in full mini-batches of the size B it was trained with, shuffled with
`random_state` (a pass that does not divide by B is topped up from the next one; a data set of fewer than B
points is one mini-batch of all of them). By default it takes one pass, at most the refiner's horizon: the
steps it was trained and evaluated for, K x max(train.horizon, eval.horizon) (past them refiners can get worse
fast: a tiny one on a linear task fell from R^2 0.94 after 5 steps to -0.04 after 200); `max_steps` sets the
count. Past the trained K it goes on with fresh mini-batches, as evaluation does (the last step embedding is
reused). `partial_fit` adds one pass over new data to the current state: streaming. Data left unread, and a
stream that goes past the horizon, are warned about (HorizonWarning).

Parametric and explicit refiners keep one state vector (theta or z), so memory stays flat however long the
stream. The implicit regime's state is its predictions at the query points, which are known only at
`predict`: it keeps the mini-batches and replays them for every `predict` call (memory grows with the data).

`standardize=True` maps the data onto the scale the refiner knows, its family's: each feature (and a regression
target) gets the family's mean and spread, from the data of `fit` (or of the first `partial_fit`); predictions,
`coef_` and `intercept_` are mapped back. Off by default: data already on the family's scale need nothing.

`model` is a run directory, a checkpoint file or an MLflow run URI (`runs:/RUN_ID`, whose `checkpoint.pt`
artifact every training run logs).
"""

from __future__ import annotations

import math
import numbers
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import NotFittedError

from iai_dist.checkpoint import CheckpointError, read_checkpoint
from iai_dist.config import ConfigError, ExperimentConfig
from iai_dist.devices import resolve_device
from iai_dist.evaluate import model_from_state
from iai_dist.refiner import IterativeModel

QUERY_CHUNK = 4096  # query points per forward pass in predict: bounded memory on large inputs


class HorizonWarning(UserWarning):
    """A fit that leaves data unread at the refiner's horizon, or a stream that refines past it."""


def horizon(cfg: ExperimentConfig) -> int:
    """The refinement steps a refiner was trained and evaluated for: K x max(train.horizon, eval.horizon)."""
    return cfg.task.steps * max(cfg.train.horizon, cfg.eval.horizon)


def load_refiner(model: str | Path, device: str = "cpu") -> tuple[IterativeModel, ExperimentConfig]:
    """The trained refiner behind `model` (a run directory, a checkpoint file, or `runs:/RUN_ID[/path]`)."""
    path = Path(_download(model) if str(model).startswith("runs:/") else model).expanduser()
    if path.is_dir():
        path = path / "checkpoint.pt"
    ckpt, cfg = read_checkpoint(path)
    return model_from_state(cfg, ckpt["model"], resolve_device(device), source=str(path)), cfg


def _download(uri: str) -> Path:
    from iai_dist.tracking import download_checkpoint  # MLflow stays in the tracking layer

    return download_checkpoint(uri)


class _AmortizedEstimator(BaseEstimator):
    """The state of one task, refined by a trained h_phi as mini-batches arrive."""

    _kind: str  # the task kind this estimator serves: "regression" or "classification"

    def __init__(self, model=None, max_steps: int | None = None, random_state: int | None = None,
                 device: str = "cpu", standardize: bool = False):
        self.model = model
        self.max_steps = max_steps
        self.random_state = random_state
        self.device = device
        self.standardize = standardize

    # -- scikit-learn API --
    def fit(self, X, y):
        """Start from the refiner's initial state and stream (X, y) through it (see the module docstring)."""
        steps = self.max_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1):
            raise ValueError(f"max_steps: expected a positive integer or None, got {steps!r}")
        refiner, cfg = self._load()
        x, targets = self._check_xy(X, y, refiner, cfg, new_classes=True)
        self._start(refiner, cfg, x, targets)
        if steps is None:
            steps = min(math.ceil(len(x) / self.batch_size_), self.horizon_)
            if steps * self.batch_size_ < len(x):
                warnings.warn(f"fit read {steps * self.batch_size_} of {len(x)} points: {steps} mini-batches of "
                              f"{self.batch_size_}, this refiner's horizon (K={cfg.task.steps} x "
                              f"{self.horizon_ // cfg.task.steps}); max_steps= reads more", HorizonWarning,
                              stacklevel=2)
        self._stream(x, targets, steps)
        return self

    def partial_fit(self, X, y, classes=None):
        """Add one pass over (X, y) to the current state (the first call starts from the initial state).
        `classes` (classifier): every label the stream will have, when the first call does not show them all."""
        if hasattr(self, "refiner_"):
            x, targets = self._check_xy(X, y, self.refiner_, self.config_, new_classes=False)
        else:
            refiner, cfg = self._load()
            if classes is not None and self._kind == "classification":
                self._check_x(X, refiner)  # nothing is set before the data are checked
                self._set_classes(np.asarray(classes), cfg, "classes")
            x, targets = self._check_xy(X, y, refiner, cfg, new_classes=classes is None)
            self._start(refiner, cfg, x, targets)
        self._stream(x, targets, math.ceil(len(x) / self.batch_size_))
        return self

    def _start(self, refiner: IterativeModel, cfg: ExperimentConfig, x: torch.Tensor, targets: torch.Tensor) -> None:
        """The initial state, once the first data has been checked, and the maps onto the family's scale."""
        self.refiner_, self.config_ = refiner, cfg
        self._x_map, self._y_map = self._scaling(refiner, cfg, x, targets)
        self.n_features_in_ = refiner.family.x_dim
        self.batch_size_ = cfg.task.batch_size
        self.horizon_ = horizon(cfg)
        self.n_steps_ = 0
        self._rng = np.random.default_rng(self.random_state)
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] = []  # the implicit regime's context
        self._state = None if self._implicit else refiner.initial_state(self._queries(1))

    def _predict_out(self, X) -> torch.Tensor:
        """The refined f's outputs at X: [n, out_dim] (values, or logits)."""
        if not hasattr(self, "refiner_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit or partial_fit first")
        x = self._check_x(X, self.refiner_) * self._x_map[0] + self._x_map[1]
        outs = [self._out_at(x[i:i + QUERY_CHUNK]) for i in range(0, len(x), QUERY_CHUNK)]
        return torch.cat(outs).cpu()

    def _scaling(self, refiner: IterativeModel, cfg: ExperimentConfig, x: torch.Tensor, targets: torch.Tensor):
        """(scale, shift) for X per feature and for regression targets: with `standardize`, the affine maps that
        give the first data (of fit, or the first partial_fit) the mean and spread of the refiner's family,
        measured on 256 of its tasks; the identity otherwise. The refiner only knows its family's scale."""
        identity = (torch.ones(x.shape[1], device=x.device), torch.zeros(x.shape[1], device=x.device))
        if not self.standardize:
            return identity, (1.0, 0.0)
        ep = refiner.family.sample(cfg.eval.seed, torch.arange(256), device=x.device)
        family_x, family_y = ep.context()
        family_x = family_x.flatten(0, 1)

        def onto(data: torch.Tensor, family: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            spread = data.std(0, unbiased=False)
            scale = family.std(0, unbiased=False) / torch.where(spread > 0, spread, torch.ones_like(spread))
            return scale, family.mean(0) - data.mean(0) * scale

        y_map = (1.0, 0.0)
        if self._kind == "regression":
            y_map = tuple(float(v) for v in onto(targets.reshape(-1), family_y.reshape(-1).float()))
        return onto(x, family_x.float()), y_map

    # -- the refinement --
    @property
    def _implicit(self) -> bool:
        return self.config_.regime.kind == "implicit"

    def _stream(self, x: torch.Tensor, targets: torch.Tensor, steps: int) -> None:
        """`steps` refinement steps on full mini-batches of B drawn without replacement, reshuffled every pass."""
        n, b, order = len(x), self.batch_size_, np.empty(0, dtype=np.int64)
        x = x * self._x_map[0] + self._x_map[1]  # onto the family's scale (the identity without standardize)
        if self._kind == "regression":
            targets = targets * self._y_map[0] + self._y_map[1]
        if self.n_steps_ <= self.horizon_ < self.n_steps_ + steps:
            k = self.config_.task.steps
            warnings.warn(f"refining to step {self.n_steps_ + steps}, past this refiner's horizon of {self.horizon_} "
                          f"steps (K={k} x {self.horizon_ // k}, what it was trained and evaluated for): refiners "
                          "can get worse past it", HorizonWarning, stacklevel=3)
        with torch.no_grad():
            for _ in _progress(range(steps), f"[adapt] {n} points", enabled=steps >= 1000):
                pick, order = self._minibatch(order, n, b)
                pick = torch.from_numpy(pick)
                xb, yb = x[pick].unsqueeze(0), targets[pick].unsqueeze(0)
                if self._implicit:
                    self._batches.append((xb, yb))
                else:
                    self._state = self._step(self._state, xb, yb, self.n_steps_, self._queries(1))
                self.n_steps_ += 1

    def _minibatch(self, order: np.ndarray, n: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """The next B indices of this pass and what is left of it. A pass that ends short is topped up from a
        fresh shuffle with points it has not shown in this mini-batch, and the new pass goes on without them:
        the refiner only ever saw mini-batches of B (fewer than B points: all of them, every step)."""
        if len(order) >= b:
            return order[:b], order[b:]
        fresh = self._rng.permutation(n)
        if n <= b:
            return fresh, fresh[:0]
        top_up = fresh[~np.isin(fresh, order)][: b - len(order)]
        return np.concatenate([order, top_up]), fresh[~np.isin(fresh, top_up)]

    def _step(self, state, xb, yb, i: int, x_query) -> torch.Tensor:
        m = self.refiner_
        step = torch.full((state.shape[0],), i, dtype=torch.long, device=xb.device)
        return m.step(state, xb, yb, m.signal(state, xb, yb), step, x_query)

    def _out_at(self, xq: torch.Tensor) -> torch.Tensor:
        m, xq = self.refiner_, xq.unsqueeze(0)
        with torch.no_grad():
            if not self._implicit:
                return m.predict(self._state, xq)[0]
            state = m.initial_state(xq)
            for i, (xb, yb) in enumerate(self._batches):
                state = self._step(state, xb, yb, i, xq)
            return m.predict(state, xq)[0]

    def _queries(self, n: int) -> torch.Tensor:
        """A placeholder query set: vector states do not depend on the query points, only on their count T."""
        return torch.zeros(1, n, self.refiner_.family.x_dim, device=self._device)

    # -- loading and checking, before anything changes --
    def _load(self) -> tuple[IterativeModel, ExperimentConfig]:
        if self.model is None:
            raise ValueError("model: expected a run directory, a checkpoint file or runs:/RUN_ID, got None")
        try:
            refiner, cfg = load_refiner(self.model, self.device)
        except (CheckpointError, ConfigError) as exc:
            raise ValueError(f"model: {exc}") from None
        if refiner.family.kind != self._kind:
            other = "AmortizedClassifier" if self._kind == "regression" else "AmortizedRegressor"
            raise ValueError(f"model: {self.model} was trained on {cfg.task.family}, a {refiner.family.kind} "
                             f"family: use {other}")
        self._device = next(refiner.parameters()).device
        return refiner, cfg

    def _check_x(self, X, refiner: IterativeModel) -> torch.Tensor:
        x = np.asarray(X)
        if x.ndim != 2:
            raise ValueError(f"X: expected a 2-D array (samples x features), got {x.ndim}-D with shape {x.shape}; "
                             "reshape a single feature with X.reshape(-1, 1), a single sample with X.reshape(1, -1)")
        if x.shape[0] == 0:
            raise ValueError(f"X: expected at least one sample, got shape {x.shape}")
        if x.shape[1] != refiner.family.x_dim:
            raise ValueError(f"X has {x.shape[1]} features, but this refiner was trained with "
                             f"task.dim={refiner.family.x_dim}")
        return self._finite(x, "X", "row")

    def _finite(self, a: np.ndarray, name: str, position: str) -> torch.Tensor:
        """float32 on the refiner's device, or one line naming what is not a finite real number in float32."""
        if a.dtype.kind == "c":
            raise ValueError(f"{name}: expected real numbers, got dtype {a.dtype}")
        try:
            with np.errstate(over="ignore"):  # said below, with where
                wide, a = a.astype(np.float64), a.astype(np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected numbers, got dtype {a.dtype}") from None
        for bad, what in ((~np.isfinite(wide), "NaN or infinity"), (~np.isfinite(a), "values beyond float32's range")):
            if bad.any():
                raise ValueError(f"{name} contains {what} (first at {position} {int(np.argwhere(bad)[0, 0])})")
        return torch.from_numpy(a).to(self._device)

    def _check_xy(self, X, y, refiner, cfg, new_classes: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._check_x(X, refiner)
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"y: expected a 1-D array of {len(x)} targets (one per row of X), got shape {y.shape}")
        return x, self._targets(y, cfg, new_classes)

    def _targets(self, y: np.ndarray, cfg: ExperimentConfig, new_classes: bool) -> torch.Tensor:
        raise NotImplementedError


class AmortizedRegressor(RegressorMixin, _AmortizedEstimator):
    """A trained regression refiner as a scikit-learn regressor. `coef_`/`intercept_`: parametric linear f."""

    _kind = "regression"

    def predict(self, X) -> np.ndarray:
        out = self._predict_out(X)[:, 0].numpy().astype(np.float64)  # not fitted: NotFittedError here
        return (out - self._y_map[1]) / self._y_map[0]

    @property
    def coef_(self) -> np.ndarray:
        """On the data's own scale: with `standardize`, the refined model's weights mapped back."""
        w, _ = self._linear_theta()
        return w[:, 0] * self._x_map[0].cpu().numpy() / self._y_map[0]

    @property
    def intercept_(self) -> float:
        w, b = self._linear_theta()
        shifted = float(b[0] + self._x_map[1].cpu().numpy() @ w[:, 0])
        return (shifted - self._y_map[1]) / self._y_map[0]

    def _linear_theta(self) -> tuple[np.ndarray, np.ndarray]:
        if not hasattr(self, "refiner_"):
            raise NotFittedError("coef_: this AmortizedRegressor is not fitted yet")
        if self.config_.regime.kind != "parametric" or self.config_.regime.model != "linear":
            raise AttributeError(f"coef_: only a parametric refiner with a linear f has coefficients (this one: "
                                 f"{self.config_.regime.kind}, {self.config_.regime.model})")
        theta = self.refiner_.regime.params(self._state)[0].cpu().numpy().astype(np.float64)  # not its memory
        d = self.n_features_in_
        return theta[:d].reshape(d, 1), theta[d:]

    def _targets(self, y, cfg, new_classes):
        return self._finite(y, "y", "index")


class AmortizedClassifier(ClassifierMixin, _AmortizedEstimator):
    """A trained classification refiner as a scikit-learn classifier. The labels seen (at most the trained N,
    `task.num_classes`) map in sorted order onto the refiner's classes 0 .. len(classes_) - 1."""

    _kind = "classification"

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]

    def predict_proba(self, X) -> np.ndarray:
        logits = self._predict_out(X)[:, : len(self.classes_)]  # the classes this data set has
        return logits.double().softmax(-1).numpy()

    def _set_classes(self, labels: np.ndarray, cfg: ExperimentConfig, name: str = "y") -> None:
        try:
            classes = np.unique(labels)
        except TypeError:  # mixed types or None: no order
            types = sorted({type(v).__name__ for v in labels.tolist()})
            raise ValueError(f"{name}: expected labels of one sortable type (numbers or strings), "
                             f"got {types}") from None
        if len(classes) < 2:
            raise ValueError(f"{name} has a single class ({_few(classes)}); a classifier needs at least 2 (a stream "
                             "whose first part shows one: partial_fit(..., classes=every label))")
        if len(classes) > cfg.task.num_classes:
            raise ValueError(f"{name} has {len(classes)} classes ({_few(classes)}), but this refiner was trained on "
                             f"task.num_classes={cfg.task.num_classes}")
        self.classes_ = classes

    def _targets(self, y, cfg, new_classes):
        if new_classes:
            if y.dtype.kind == "f" and not np.isfinite(y).all():
                raise ValueError("y contains NaN or infinity")
            self._set_classes(y, cfg)
        unknown = ~np.isin(y, self.classes_)
        if unknown.any():
            raise ValueError(f"y has labels {_few(np.unique(y[unknown]))} not among classes_ {_few(self.classes_)}")
        return torch.from_numpy(np.searchsorted(self.classes_, y)).long().to(self._device)


def _few(values: np.ndarray, n: int = 5) -> str:
    shown = ", ".join(map(str, values[:n]))
    return f"[{shown}{', ...' if len(values) > n else ''}]"


def _progress(steps, label: str, enabled: bool):
    """Yield from `steps`, printing a progress line to stderr about every 2 s on long streams."""
    total, start, last = len(steps), time.monotonic(), 0.0
    for i in steps:
        yield i
        now = time.monotonic() - start
        if enabled and (now - last >= 2 or i + 1 == total):
            last = now
            bar = "#" * int(30 * (i + 1) / total)
            print(f"\r{label}: [{bar:<30}] step {i + 1}/{total} | {(i + 1) / max(now, 1e-9):.0f} steps/s",
                  end="\n" if i + 1 == total else "", file=sys.stderr, flush=True)


if __name__ == "__main__":  # the command: the estimators on CSV files
    from iai_dist.adapt_command import main

    sys.exit(main())
