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


@pytest.fixture
def replay_by_name():
    """Replays a saved graph's rewrites by their pass names, for tests that saved the state
    themselves (the compile driver replays only the passes its spec's pipeline built)."""
    from flexc.passes import resolve_pass

    def replay(rewrite, graph, workdir):
        resolve_pass(rewrite["pass"])(rewrite["options"]).replay(graph, workdir / rewrite["pass"])

    return replay


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory):
    """A tiny random Qwen3-MoE checkpoint with a byte-level BPE tokenizer (never written to)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "broken_specs"))
    import compiler_helpers

    return compiler_helpers.make_tiny_moe(tmp_path_factory.mktemp("models") / "tiny-qwen3-moe")
