"""Test-wide settings. Eight simulated CPU devices so sharding tests run on one machine; set before jax loads."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    try:
        import torch
        torch.set_num_threads(2)
    except ImportError:
        pass


@pytest.fixture
def rng():
    return np.random.default_rng(0)
