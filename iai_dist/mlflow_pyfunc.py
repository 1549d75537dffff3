"""The file the refiner's MLflow model is logged from (MLflow's "models from code"): loading the model runs
it, with the iai_dist package logged beside it on the path, instead of unpickling an object."""

import mlflow

from iai_dist.mlflow_model import AmortizedInference

mlflow.models.set_model(AmortizedInference())
