"""The compile state: typed fields saved and loaded exactly, the dict form older passes use, old state folders."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from flexc.ir.state import CompileState
from flexc.ir.tables import WidthTables
from flexc.passes import PassContext

GROUPS = [SimpleNamespace(layer=1, intermediate_size=8), SimpleNamespace(layer=3, intermediate_size=8)]


def tables() -> WidthTables:
    t = torch.tensor([[[8, 8, 4], [8, 4, 4]], [[4, 8, 0], [4, 4, 4]]])
    return WidthTables([0.75, 0.3], t, "flops", layers=[1, 3], full=[8, 8])


def full_state() -> CompileState:
    g = torch.Generator().manual_seed(0)
    return CompileState(
        routing_counts=torch.rand(2, 3, generator=g, dtype=torch.float64),
        routing_weight_sums=torch.rand(2, 3, generator=g, dtype=torch.float64),
        channel_scores=torch.rand(2, 3, 8, generator=g),
        width_tables=tables(), width_method="coverage", expert_masks=torch.zeros(2, 2, 3, dtype=torch.bool),
        recovered_keep=0.3, kernel_backend="reference",
        extras={"mine": {"t": torch.arange(3), "note": "x", "n": [1, 2.5, None]}})


def test_save_and_load_give_back_every_field_exactly(tmp_path):
    state = full_state()
    state.save(tmp_path)
    back = CompileState.load(tmp_path)
    for name in ("routing_counts", "routing_weight_sums", "channel_scores", "expert_masks"):
        a, b = getattr(state, name), getattr(back, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert back.width_tables.budgets == [0.75, 0.3] and back.width_tables.metric == "flops"
    assert torch.equal(back.width_tables.tables, state.width_tables.tables)
    assert (back.width_tables.layers, back.width_tables.full) == ([1, 3], [8, 8])
    assert (back.width_method, back.recovered_keep, back.kernel_backend) == ("coverage", 0.3, "reference")
    assert torch.equal(back.extras["mine"]["t"], torch.arange(3)) and back.extras["mine"]["n"] == [1, 2.5, None]
    # the width tables are stored in the one file form every artifact uses
    assert torch.equal(WidthTables.load(tmp_path / "flexc_widths.safetensors").tables, state.width_tables.tables)


def test_budgets_are_rounded_floats_whatever_the_writer_used():
    as_float32 = WidthTables(torch.tensor([0.75, 0.3]).tolist(), tables().tables, "params", [1, 3], [8, 8])
    assert as_float32.budgets == [0.75, 0.3]


def test_the_dict_form_reaches_the_typed_fields_and_extras():
    state = CompileState()
    assert "routing_counts" not in state and state.get("routing_counts") is None
    state["routing_counts"] = torch.ones(2, 3)
    assert state.routing_counts is state["routing_counts"]
    state["my_pass"] = {"a": 1}
    assert state.extras == {"my_pass": {"a": 1}}
    with pytest.raises(TypeError, match="one record"):
        state["width_tables"] = torch.zeros(1, 2, 3)
    state.width_tables = tables()
    assert torch.equal(state["width_tables"], state.width_tables.tables) and state["width_metric"] == "flops"
    assert state["width_budgets"].tolist() == [0.75, 0.3]
    assert set(state) == {"width_budgets", "width_tables", "width_metric", "routing_counts", "my_pass"}
    copy = state.copy()
    copy.routing_counts, copy.extras["other"] = None, 2
    assert state.routing_counts is not None and "other" not in state.extras
    del state["my_pass"], state["routing_counts"]
    assert state.extras == {} and state.routing_counts is None


def test_contexts_given_a_dict_get_a_typed_state():
    ctx = PassContext(workdir=None, state={"channel_scores": torch.ones(2, 3, 8), "toy": True})
    assert isinstance(ctx.state, CompileState) and ctx.state.channel_scores.shape == (2, 3, 8)
    assert ctx.state.extras == {"toy": True}
    assert isinstance(PassContext(workdir=None).state, CompileState)


def test_a_state_folder_written_before_the_state_was_typed_still_loads(tmp_path):
    t = tables()
    save_file({"width_budgets": torch.tensor(t.budgets), "width_tables": t.tables,
               "routing_counts": torch.ones(2, 3), "toy_scores/layer0": torch.arange(4.0)},
              str(tmp_path / "ctx_state.safetensors"))
    (tmp_path / "ctx_state.json").write_text(json.dumps({
        "width_budgets": {"__tensor__": "width_budgets"}, "width_tables": {"__tensor__": "width_tables"},
        "width_metric": "flops", "routing_counts": {"__tensor__": "routing_counts"},
        "toy_scores": {"layer0": {"__tensor__": "toy_scores/layer0"}, "note": "ranked"}, "recovered_keep": 0.3}))
    state = CompileState.load(tmp_path, GROUPS)
    assert state.width_tables.budgets == [0.75, 0.3] and torch.equal(state.width_tables.tables, t.tables)
    assert state.width_tables.layers == [1, 3] and state.recovered_keep == 0.3
    assert torch.equal(state.routing_counts, torch.ones(2, 3)) and state.extras["toy_scores"]["note"] == "ranked"
