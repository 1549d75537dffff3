import pytest
import torch

from iai_dist.config import load_config


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture
def tiny_cfg():
    """A seconds-long config; tests add --set style overrides with `.with_overrides`."""
    return load_config("tiny", overrides=["tracking.enabled=false", "eval.one_step=false"])
