"""Shared test configuration and fixtures."""

import torch

# Test tensors are tiny: one intra-op thread is faster than two, and far faster when other
# processes share the cores (spinning OpenMP workers then starve each other).
torch.set_num_threads(1)
