"""Shared test helpers: compose the real Hydra config, shrunk for speed (lightning-hydra-template style)."""
import pytest
import torch
from hydra import compose, initialize_config_dir

from mlbreg.cli import config_dir, register_resolvers

register_resolvers()


def make_cfg(*overrides: str):
    """The real `conf/train.yaml` composed with overrides (progress bar off)."""
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("train", overrides=["progress=false", *overrides])


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # 2-core CI machine: one thread per test process keeps timings and results stable
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
