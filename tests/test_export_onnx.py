"""The onnx export: ONNX Runtime == the torch nested runtime per budget, pruned weights, model untouched."""

import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from flexc.compiler.exporters import ExportContext, get_exporter
from flexc.export.onnx_export import (
    CHECK_SHAPES,
    MANIFEST_FILE,
    MODEL_FILE,
    TRACE_SHAPE,
    FusedExperts,
    OnnxExportError,
    write_onnx,
)
from flexc.export.slicing import slice_experts
from flexc.export.tables import WidthTables, budget_key
from flexc.ir.experts_impl import WIDTHS_BUFFER, canonical_weights, expert_activation, set_widths, use_flexc_experts
from flexc.ir.groups import find_expert_groups
from flexc.ir.op import ExpertLayout, ExpertWeights, moe_experts_reference
from flexc.ir.testing import tiny_families, tiny_model

ort = pytest.importorskip("onnxruntime")

BUDGETS = [0.75, 0.4]
GRANULE = 16
NEW_SHAPES = [(4, 9), (1, 17)]  # neither the traced shape nor the validation shapes
assert not set(NEW_SHAPES) & {TRACE_SHAPE, *CHECK_SHAPES}


def nested_tables(groups, budgets, seed=0) -> WidthTables:
    """Random nested width tables: multiples of 16, each table holding 0 and the full width."""
    g = torch.Generator().manual_seed(seed)
    full = groups[0].intermediate_size
    steps = full // GRANULE
    tables, current = [], torch.full((len(groups), groups[0].num_experts), steps)
    for _ in budgets:
        current = torch.minimum(current, torch.randint(0, steps + 1, current.shape, generator=g))
        current[:, 0], current[:, -1] = steps, 0  # full width and a removed expert in every layer
        tables.append(current.clone())
    return WidthTables(budgets=budgets, tables=torch.stack(tables) * GRANULE, metric="params",
                       layers=[gr.layer for gr in groups], full=[gr.intermediate_size for gr in groups])


def context(model, groups, tables, target) -> ExportContext:
    state = {"width_budgets": tables.budgets, "width_tables": tables.tables, "width_metric": tables.metric}
    return ExportContext(target=target, spec=None, graph=SimpleNamespace(groups=groups), model=model,
                         state=state, logger=logging.getLogger("test"))


def snapshot(model):
    return {
        "params": {n: (p, p.detach().clone()) for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "modules": dict(model.named_modules()),
        "impl": model.config._experts_implementation,
        "training": model.training,
    }


def nested_logits(model, groups, widths, feed):
    """The torch reference: flexc's experts implementation at ``widths``, undone afterwards."""
    impl = model.config._experts_implementation
    use_flexc_experts(model)
    try:
        for g, row in zip(groups, widths):
            set_widths(model.get_submodule(g.path), row)
        with torch.no_grad():
            return model(**feed, use_cache=False).logits
    finally:
        for g in groups:
            set_widths(model.get_submodule(g.path), None)
        model.set_experts_implementation(impl)


def random_feed(vocab, shape, seed, pad=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(shape, dtype=torch.long)
    mask[-1, :pad] = 0
    return {"input_ids": torch.randint(0, vocab, shape, generator=g), "attention_mask": mask}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One run of the registered exporter on tiny qwen3_moe at two budgets (the expensive part)."""
    model = tiny_model("qwen3_moe")
    groups = find_expert_groups(model)
    tables = nested_tables(groups, BUDGETS)
    before = snapshot(model)
    target = tmp_path_factory.mktemp("onnx")
    get_exporter("onnx")(context(model, groups, tables, target))
    return SimpleNamespace(model=model, groups=groups, tables=tables, target=target, before=before)


def test_layout_and_manifests(exported):
    top = json.loads((exported.target / MANIFEST_FILE).read_text())
    assert top["kind"] == "onnx" and [row["keep"] for row in top["budgets"]] == BUDGETS
    for row in top["budgets"]:
        folder = exported.target / budget_key(row["keep"])
        m = json.loads((folder / MANIFEST_FILE).read_text())
        assert m["kind"] == "onnx" and m["budget"] == row["keep"] and m["exporter"] == "dynamo"
        assert m["opset"] >= 18 and 0 <= m["validation"]["max_abs_diff"] <= 1e-4
        assert m["bytes"] == (folder / MODEL_FILE).stat().st_size  # tiny: one self-contained file


@pytest.mark.parametrize("budget", BUDGETS)
def test_onnxruntime_matches_nested_runtime_at_new_shapes(exported, budget):
    session = ort.InferenceSession(str(exported.target / budget_key(budget) / MODEL_FILE),
                                   providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert all(isinstance(d, str) for shape in inputs.values() for d in shape)  # symbolic batch, sequence
    vocab = exported.model.config.vocab_size
    for i, shape in enumerate(NEW_SHAPES):
        feed = random_feed(vocab, shape, seed=10 + i, pad=3)
        (got,) = session.run(["logits"], {k: v.numpy() for k, v in feed.items()})
        want = nested_logits(exported.model, exported.groups, exported.tables.table(budget), feed)
        assert got.shape == (*shape, vocab)
        real = feed["attention_mask"].bool()
        assert (torch.from_numpy(got) - want).abs()[real].max() <= 1e-4


def test_file_shrinks_with_budget_by_the_pruned_weights(exported):
    sizes = [(exported.target / budget_key(b) / MODEL_FILE).stat().st_size for b in BUDGETS]
    assert sizes[0] > sizes[1]
    kept = [int(exported.tables.table(b).sum()) for b in BUDGETS]
    hidden = exported.groups[0].hidden_size
    removed = (kept[0] - kept[1]) * (3 * hidden * 4 + 8)  # gate row, up row, down column (fp32); expert id (int64)
    # Everything else in the two files is the same graph; allow for small index/metadata noise.
    assert abs((sizes[0] - sizes[1]) - removed) < 0.02 * removed + 4096


def test_exporter_leaves_the_model_unchanged(exported):
    model, before = exported.model, exported.before
    assert dict(model.named_modules()) == before["modules"]
    assert model.config._experts_implementation == before["impl"] and model.training == before["training"]
    for name, p in model.named_parameters():
        same_object, value = before["params"][name]
        assert p is same_object and p.dtype == value.dtype and torch.equal(p, value), name
    assert set(dict(model.named_buffers())) == set(before["buffers"])  # no widths buffer left behind
    for name, b in model.named_buffers():
        assert torch.equal(b, before["buffers"][name]), name
    assert not any(WIDTHS_BUFFER in m._buffers for m in model.modules())


@pytest.mark.parametrize("family", tiny_families())
def test_fused_experts_equal_reference_op(family):
    """The export-friendly module computes the canonical op at the same widths (no export needed)."""
    model = tiny_model(family)
    group = find_expert_groups(model)[0]
    experts = model.get_submodule(group.path)
    widths = torch.tensor([32, 0, 16, 32, 16, 0, 32, 16])
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, group.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(group.num_experts, generator=g)[: group.top_k] for _ in range(11)])
    weights = torch.rand(11, group.top_k, generator=g)
    gate_up, down = canonical_weights(experts)
    activation, alpha, limit = expert_activation(experts)
    biases = (experts.gate_up_proj_bias, experts.down_proj_bias) if group.has_bias else (None, None)
    layout = ExpertLayout(activation, group.interleaved, alpha, limit)  # the group's view, not slice_experts'
    want = moe_experts_reference(hidden, ids, weights, ExpertWeights(gate_up, down, *biases, layout), widths)
    fused = FusedExperts(slice_experts(experts, widths), group.num_experts)
    with torch.no_grad():
        assert torch.allclose(fused(hidden, ids, weights), want, atol=1e-5)
    assert fused.kept_channels == int(widths.sum())
    empty = FusedExperts(slice_experts(experts, torch.zeros(8, dtype=torch.long)), group.num_experts)
    assert torch.equal(empty(hidden, ids, weights), torch.zeros_like(hidden))


def test_mismatch_fails_the_export_with_a_clear_message(tmp_path):
    model = tiny_model("qwen3_moe")
    groups = find_expert_groups(model)
    widths = nested_tables(groups, [0.5]).table(0.5)
    with pytest.raises(OnnxExportError, match=r"does not match torch at keep 0.5: max abs logit diff"):
        write_onnx(tmp_path, model, groups, widths, budget=0.5, tolerance=-1.0, dynamo=False)


def test_torchscript_exporter_also_matches(tmp_path):
    model = tiny_model("qwen3_moe")
    groups = find_expert_groups(model)
    widths = nested_tables(groups, [0.5], seed=3).table(0.5)
    m = write_onnx(tmp_path, model, groups, widths, budget=0.5, dynamo=False)
    assert m["exporter"] == "torchscript" and m["validation"]["max_abs_diff"] <= 1e-4


def test_no_width_tables_is_a_clear_error(tmp_path):
    model = tiny_model("qwen3_moe")
    ctx = ExportContext(target=tmp_path, spec=None, model=model, state={})
    with pytest.raises(OnnxExportError, match="needs width tables"):
        get_exporter("onnx")(ctx)


def test_missing_onnx_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(OnnxExportError, match=r"onnxruntime.*pip install 'flexc\[onnx\]'"):
        get_exporter("onnx")(ExportContext(target=tmp_path, spec=None))


def test_registering_does_not_import_onnx():
    code = ("import sys, flexc.compiler.exporters as e; assert 'onnx' in e.available_exports(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'onnxscript')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not os.environ.get("FLEXC_ONNX_ALL_FAMILIES"),
                    reason="dynamo export of every family takes minutes; set FLEXC_ONNX_ALL_FAMILIES=1")
@pytest.mark.parametrize("family", [f for f in tiny_families() if f != "qwen3_moe"])
def test_other_families_export(family, tmp_path):
    model = tiny_model(family)
    groups = find_expert_groups(model)
    widths = nested_tables(groups, [0.5]).table(0.5)
    m = write_onnx(tmp_path, model, groups, widths, budget=0.5)
    assert m["validation"]["max_abs_diff"] <= 1e-4
