"""What ``FlexGraph.save_state`` writes: what passes changed, not the model.

Weights the ranking only permuted are re-derived on restore from a fresh lowering of the same
source and the saved permutations; a parameter changed in any other way is saved in full. The
restored graph must equal the saved one exactly (resuming a compile is bit-identical).
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open

from flexc.ir import lower
from flexc.ir.graph import STATE_WEIGHTS
from flexc.ir.testing import tiny_model
from flexc.passes import PassContext, resolve_pass


def _ranked(tmp_path, family="qwen3_moe"):
    model = tiny_model(family)
    graph = lower(model)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, model.config.vocab_size, (2, 12), generator=g) for _ in range(2)]
    ctx = PassContext(workdir=tmp_path / "rank", calibration_data=data, logger=logging.getLogger("test"), quiet=True)
    resolve_pass("rank_channels")({"plot": False})(graph, ctx)
    return graph


def _saved_names(directory) -> set[str]:
    with safe_open(str(directory / STATE_WEIGHTS), framework="pt") as f:
        return set(f.keys())


def _assert_same_parameters(a, b) -> None:
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])  # gpt_oss: interleaved gate/up with biases
def test_ranked_weights_are_not_saved_and_restore_exactly(family, tmp_path):
    graph = _ranked(tmp_path, family)
    assert graph.changed_parameters() == []
    graph.save_state(tmp_path / "state")
    saved = _saved_names(tmp_path / "state")
    params = {n for n, _ in graph.model.named_parameters()}
    assert not saved & params  # no weight: the permutations re-derive the ranked experts
    assert {k for k in saved if k.startswith("channel_perm::")} == {f"channel_perm::{i}" for i in range(len(graph.groups))}

    fresh = lower(tiny_model(family))
    fresh.load_state(tmp_path / "state")
    _assert_same_parameters(graph, fresh)
    assert fresh.changed_parameters() == []


def test_a_weight_changed_in_place_is_saved_and_stays_saved_after_a_restore(tmp_path):
    graph = _ranked(tmp_path)
    norm = next(n for n, _ in graph.model.named_parameters() if n.endswith("norm.weight"))
    expert = f"{graph.groups[0].path}.down_proj"
    with torch.no_grad():
        dict(graph.model.named_parameters())[norm].mul_(1.5)
        dict(graph.model.named_parameters())[expert][0].add_(0.25)  # after the ranking: not derivable
    assert set(graph.changed_parameters()) == {norm, expert}
    graph.save_state(tmp_path / "state")
    assert {norm, expert} <= _saved_names(tmp_path / "state")

    fresh = lower(tiny_model("qwen3_moe"))
    fresh.load_state(tmp_path / "state")
    _assert_same_parameters(graph, fresh)
    assert set(fresh.changed_parameters()) == {norm, expert}  # a second save writes them again
    fresh.save_state(tmp_path / "again")
    assert _saved_names(tmp_path / "again") == _saved_names(tmp_path / "state")


def test_a_change_through_data_counts_once_marked(tmp_path):
    graph = lower(tiny_model("qwen3_moe"))
    name, param = next(iter(graph.model.named_parameters()))
    param.data.mul_(2.0)  # behind autograd's back: the version counter does not move
    assert name not in graph.changed_parameters()
    graph.mark_changed(name)
    assert graph.changed_parameters() == [name]


def test_a_state_that_saved_every_parameter_still_restores(tmp_path):
    """The format written before: every parameter in the file, no permutations."""
    import json

    from safetensors.torch import save_file

    graph = _ranked(tmp_path)
    graph.save_state(tmp_path / "state")
    meta_path = tmp_path / "state" / "graph_meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["weights"]
    meta_path.write_text(json.dumps(meta))
    with safe_open(str(tmp_path / "state" / STATE_WEIGHTS), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("channel_perm::")}
    tensors.update({n: p.detach().contiguous() for n, p in graph.model.named_parameters()})
    save_file(tensors, str(tmp_path / "state" / STATE_WEIGHTS))

    fresh = lower(tiny_model("qwen3_moe"))
    fresh.load_state(tmp_path / "state")
    _assert_same_parameters(graph, fresh)
