import pytest
import torch

from iai_dist.config import load_config

RAY_FIXTURES = {"ray_local", "sweep", "cluster", "tracking_server"}


def pytest_collection_modifyitems(items):
    """Every test on a real Ray (tens of seconds each) is marked slow: `make test` runs them all the same;
    `make test ARGS="-m 'not slow'"` is the quick loop (under a minute)."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _own_tracking_uri(monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: never let one test's store leak into the next."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def tiny_cfg():
    """A seconds-long config; tests add --set style overrides with `.with_overrides`."""
    return load_config("tiny", overrides=["tracking.enabled=false", "eval.one_step=false"])


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance (loopback) shared by every test that needs Ray, shut down at the end."""
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # system metrics every second (every Ray worker inherits it): short test runs still log some
    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
