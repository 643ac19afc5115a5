"""Shared test configuration and fixtures."""

import pytest
import torch

# Test tensors are tiny: one intra-op thread is faster than two, and far faster when other
# processes share the cores (spinning OpenMP workers then starve each other).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir():
    """Checkpoint directory of the trained ``tiny`` zoo model (built once, then cached)."""
    import flexc.zoo

    return flexc.zoo.resolve("tiny", progress=False)
