"""fold_masks, the nested artifact and the nested runtime (flexc.load, set_budget)."""

import json
import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import flexc
from flexc.compiler.exporters import ExportContext, get_exporter
from flexc.export.tables import BudgetError, WidthTables
from flexc.ir import lower
from flexc.ir.experts_impl import WIDTHS_BUFFER
from flexc.ir.testing import tiny_model
from flexc.passes import PassContext, resolve_pass
from flexc.passes.manager import run_pass

BUDGETS = (0.75, 0.5, 0.25)


def data(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (2, 12), generator=g) for _ in range(n)]


def annealed_graph(tmp_path):
    """A tiny qwen3_moe model ranked, gated, annealed for a few steps: real width tables."""
    model = tiny_model("qwen3_moe", moe_intermediate_size=64)
    graph = lower(model)
    spec = SimpleNamespace(budgets=SimpleNamespace(keep_ratios=BUDGETS, metric="params"))
    ctx = PassContext(workdir=tmp_path / "work", spec=spec, calibration_data=data(), quiet=True,
                      logger=logging.getLogger("test"))
    run_pass(resolve_pass("rank_channels")({"plot": False}), graph, ctx)
    ranked = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_pass(resolve_pass("insert_action_gates")({"levels": 4}), graph, ctx)
    run_pass(resolve_pass("anneal")({"steps": 12, "lr": 0.2, "checkpoint_every": 100}), graph, ctx)
    return graph, ctx, ranked


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    root = tmp_path_factory.mktemp("nested")
    graph, ctx, ranked = annealed_graph(root)
    run_pass(resolve_pass("fold_masks")(), graph, ctx)
    target = root / "nested"
    get_exporter("nested")(ExportContext(target=target, spec=None, graph=graph, model=graph.model,
                                         state=ctx.state, logger=logging.getLogger("test")))
    return graph, ctx, ranked, target


def test_fold_removes_gates_and_runs_at_full_width(folded):
    graph, _, ranked, _ = folded
    assert not [n for n, _ in graph.module.named_children() if n.startswith("flexc_gates_")]
    assert len(graph.expert_nodes()) == len(graph.groups)
    assert "nested" in graph.properties and "action_gates" not in graph.properties
    for name, p in graph.model.named_parameters():  # folding never touches the weights
        assert torch.equal(p, ranked[name])
    ids = data(1, seed=5)[0]
    eager = graph.model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(graph.logits(ids), eager, atol=1e-5, rtol=0)


def test_folded_graph_switches_budget_through_width_buffers(folded):
    graph, ctx, _, _ = folded
    tables = ctx.state.width_tables
    ids = data(1, seed=6)[0]
    full = graph.logits(ids)
    graph.set_widths(tables.table(0.25))
    low = graph.logits(ids)
    graph.set_widths(None)
    assert (low - full).abs().max() > 1e-3  # a quarter of the channels really changes the output
    torch.testing.assert_close(graph.logits(ids), full, atol=0, rtol=0)


def test_nested_artifact_loads_without_flexc_and_equals_the_ranked_model(folded, tmp_path):
    graph, _, _, target = folded
    ids = data(1, seed=7)[0]
    graph.set_widths(None)
    expected = graph.model(input_ids=ids, use_cache=False).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    # A fresh interpreter in which importing flexc fails: the weights are a plain HF checkpoint.
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "flexc" or name.startswith("flexc."):
            raise ImportError("flexc is blocked in this test")
sys.meta_path.insert(0, Block())
try:
    import flexc
    raise SystemExit("flexc importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(target)!r}).eval()
ref = torch.load({str(tmp_path / "expected.pt")!r})
diff = (m(input_ids=ref["ids"], use_cache=False).logits - ref["logits"]).abs().max().item()
print("DIFF", diff)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    diff = float(out.stdout.split("DIFF")[-1])
    assert diff <= 1e-5


def test_manifest_records_every_budget(folded):
    _, ctx, _, target = folded
    manifest = json.loads((target / "flexc_manifest.json").read_text())
    assert manifest["kind"] == "nested"
    assert [b["keep"] for b in manifest["budgets"]] == list(BUDGETS)
    totals = [b["total_params"] for b in manifest["budgets"]]
    assert manifest["full"]["total_params"] > totals[0] > totals[1] > totals[2]
    tables = ctx.state.width_tables
    for row, table in zip(manifest["budgets"], tables.tables):
        routed = int(table.sum()) * 3 * manifest["layers"][0]["hidden_size"]  # qwen3: no expert biases
        assert row["routed_params"] == routed
        assert row["keep"] - 0.25 <= row["keep_achieved"] <= row["keep"] + 1e-9


def test_load_at_budget_equals_graph_at_that_budget(folded):
    graph, ctx, _, target = folded
    tables = ctx.state.width_tables
    ids = data(1, seed=8)[0]
    model = flexc.load(target, budget=0.5)
    assert model.flexc.budgets == list(BUDGETS)
    for b in (0.5, 0.25, 1.0, 0.75):
        model.set_budget(b)
        graph.set_widths(tables.table(b))
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, graph.logits(ids),
                                   atol=1e-5, rtol=0)
    graph.set_widths(None)


def test_set_budget_copies_no_weights(folded):
    _, _, _, target = folded
    model = flexc.load(target)
    weights = {n: (p.data_ptr(), p.clone()) for n, p in model.named_parameters()}
    buffers = {g.path: getattr(model.get_submodule(g.path), WIDTHS_BUFFER).data_ptr() for g in model.flexc.groups}
    for b in (0.25, 0.75, 1.0, 0.5):
        model.set_budget(b)
        assert torch.equal(model.flexc.widths(), model.flexc.tables.table(b))
    for n, p in model.named_parameters():
        assert p.data_ptr() == weights[n][0] and torch.equal(p, weights[n][1])
    for g in model.flexc.groups:
        assert getattr(model.get_submodule(g.path), WIDTHS_BUFFER).data_ptr() == buffers[g.path]


def test_generate_and_layer_overrides(folded):
    _, _, _, target = folded
    model = flexc.load(target, budget=0.25)
    ids = data(1, seed=9)[0][:1, :5]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
    layer = model.flexc.groups[0].layer
    model.set_budget(0.5, overrides={layer: [16] * 8})
    assert model.flexc.widths()[0].tolist() == [16] * 8 and model.flexc.budget is None
    with pytest.raises(ValueError, match="widths must be 8 values"):
        model.flexc.set_layer_widths({layer: [16] * 3})


def test_unknown_budget_lists_the_available_ones(folded):
    _, _, _, target = folded
    with pytest.raises(BudgetError, match=r"available budgets: 0.75, 0.5, 0.25"):
        flexc.load(target, budget=0.6)
    model = flexc.load(target)
    with pytest.raises(BudgetError, match="no width table for budget 0.1"):
        model.set_budget(0.1)


def test_load_rejects_what_is_not_an_artifact(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a flexc artifact"):
        flexc.load(tmp_path)


def test_tables_must_be_nested():
    tables = torch.tensor([[[32, 16]], [[16, 32]]])
    with pytest.raises(ValueError, match="not nested: layer 0 expert 1 grows from 16 to 32"):
        WidthTables(budgets=[0.75, 0.5], tables=tables, metric="params", layers=[0], full=[32])


def test_folded_state_resumes_on_a_fresh_graph(folded, tmp_path, replay_by_name):
    graph, _, _, _ = folded
    graph.save_state(tmp_path / "state")
    fresh = lower(tiny_model("qwen3_moe", moe_intermediate_size=64))
    fresh.load_state(tmp_path / "state", replay=replay_by_name)  # replays gates, then their folding
    assert [r["pass"] for r in fresh.rewrites] == ["insert_action_gates", "fold_masks"]
    assert len(fresh.expert_nodes()) == len(fresh.groups)
    ids = data(1, seed=10)[0]
    torch.testing.assert_close(fresh.logits(ids), graph.logits(ids), atol=1e-6, rtol=0)


def test_exports_refuse_whole_expert_pruning(folded, tmp_path):
    graph, ctx, _, _ = folded
    state = ctx.state.copy()
    state.expert_masks = torch.zeros(len(BUDGETS), 2, 8, dtype=torch.bool)
    state.expert_masks[2, 0, 3] = True
    with pytest.raises(ValueError, match="remove whole experts"):
        get_exporter("nested")(ExportContext(target=tmp_path / "n", spec=None, graph=graph, model=graph.model,
                                             state=state, logger=logging.getLogger("test")))
