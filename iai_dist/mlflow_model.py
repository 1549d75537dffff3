"""The trained refiner as an MLflow pyfunc model: one call adapts to a data set and predicts.

Input, one frame per call: feature columns x0 .. x{d-1}, the target `y` and a `role` column. Rows whose role
is `context` are the data to adapt to (streamed through the refiner as `AmortizedRegressor.fit` does); rows
whose role is `query` get a prediction (their `y` is ignored). Params: `random_state` (the mini-batch shuffle,
default 0), `max_steps` (refinement steps; 0, the default, is one pass over the context, at most the refiner's
horizon, as `fit` does) and `standardize` (false; true maps the context onto the family's scale, as the
estimator's option does). Output: a `prediction` column, one row per query row, in order.

Every tracked training run logs it as the `refiner` model of its MLflow run, with the checkpoint as its
artifact and the iai_dist package as its code, so it loads with `mlflow.pyfunc.load_model` anywhere the
dependencies are installed.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from iai_dist.config import ExperimentConfig

MODEL_NAME = "refiner"  # the model's name in its run: runs:/RUN_ID/refiner


class AmortizedInference(mlflow.pyfunc.PythonModel):
    """Adapts a fresh estimator to the call's context rows, predicts at its query rows."""

    def load_context(self, context) -> None:
        from iai_dist.adapt import load_refiner

        self.checkpoint = context.artifacts["checkpoint"]
        refiner, _ = load_refiner(self.checkpoint)
        self.kind, self.dim = refiner.family.kind, refiner.family.x_dim

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from iai_dist.adapt import AmortizedClassifier, AmortizedRegressor

        params = params or {}
        for column in ("role", "y", *(f"x{i}" for i in range(self.dim))):
            if column not in model_input.columns:
                raise ValueError(f"input: expected columns x0..x{self.dim - 1}, y and role; {column!r} is missing")
        roles = model_input["role"].astype(str)
        if not set(roles) <= {"context", "query"}:
            raise ValueError(f"input: role must be 'context' or 'query', got {sorted(set(roles) - {'context', 'query'})}")
        features = [f"x{i}" for i in range(self.dim)]
        context_rows, query_rows = model_input[roles == "context"], model_input[roles == "query"]
        if len(context_rows) == 0 or len(query_rows) == 0:
            raise ValueError("input: expected at least one 'context' row and one 'query' row")
        y = context_rows["y"].to_numpy()
        cls = AmortizedRegressor if self.kind == "regression" else AmortizedClassifier
        est = cls(model=self.checkpoint, max_steps=int(params.get("max_steps", 0)) or None,
                  random_state=int(params.get("random_state", 0)), standardize=bool(params.get("standardize", False)))
        est.fit(context_rows[features].to_numpy(np.float64), y.astype(np.float64) if self.kind == "regression" else y)
        return pd.DataFrame({"prediction": np.asarray(est.predict(query_rows[features].to_numpy(np.float64)),
                                                      dtype=np.float64)})


def signature(dim: int) -> ModelSignature:
    inputs = Schema([*(ColSpec("double", f"x{i}") for i in range(dim)), ColSpec("double", "y"), ColSpec("string", "role")])
    params = ParamSchema([ParamSpec("random_state", "long", 0), ParamSpec("max_steps", "long", 0),
                          ParamSpec("standardize", "boolean", False)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("double", "prediction")]), params=params)


def input_example(cfg: ExperimentConfig) -> pd.DataFrame:
    """One task of the trained family: K mini-batches of context and 4 query points."""
    from iai_dist.tasks import build_family

    ep = build_family(cfg.task).sample(cfg.eval.seed, torch.tensor([0]))
    x, y = ep.context()
    rows = [(*map(float, xi), float(yi), "context") for xi, yi in zip(x[0], y[0])]
    rows += [(*map(float, xi), 0.0, "query") for xi in ep.x_query[0, :4]]
    return pd.DataFrame(rows, columns=[*(f"x{i}" for i in range(cfg.task.dim)), "y", "role"])


def log_refiner(checkpoint: Path, cfg: ExperimentConfig, register: str | None = None):
    """Log the refiner as the active run's `refiner` pyfunc model (and register it under `register`)."""
    import iai_dist

    return mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        python_model=str(Path(__file__).with_name("mlflow_pyfunc.py")),
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(Path(iai_dist.__file__).parent)],
        signature=signature(cfg.task.dim),
        input_example=input_example(cfg),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "scikit-learn", "pandas", "pydantic>=2.5",
                          "pyyaml", f"mlflow=={mlflow.__version__}"],
        registered_model_name=register,
    )
