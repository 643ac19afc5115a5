"""The sliced export: per-budget checkpoints with pruned channels removed.

For every family's tiny model and random nested width tables (granule 16, with removed and
full-width experts), the sliced model at budget b computes what the nested runtime computes at
b, files and parameters shrink with the budget, and the checkpoint loads with plain
transformers (``trust_remote_code=True``) in a process that cannot import flexc.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from flexc.compiler.exporters import ExportContext, get_exporter
from flexc.export.sliced import MANIFEST_FILE, MODELING_FILE, SlicedExportError, load_sliced
from flexc.export.tables import BudgetError, WidthTables, budget_key
from flexc.ir.experts_impl import set_widths, use_flexc_experts
from flexc.ir.groups import find_expert_groups
from flexc.ir.testing import tiny_families, tiny_model


BUDGETS = [0.7, 0.35]
FAMILIES = tiny_families()


def random_nested_tables(groups, seed: int) -> WidthTables:
    """Two nested tables of widths in {0, 16, 32}; both hold a removed and a full expert, and
    the second is strictly smaller. One family gets a layer with every expert removed."""
    g = torch.Generator().manual_seed(seed)
    shape = (len(groups), groups[0].num_experts)
    high = torch.randint(0, 3, shape, generator=g) * 16
    low = torch.minimum(high, torch.randint(0, 3, shape, generator=g) * 16)
    for t in (high, low):
        t[0, 0], t[0, 1] = 32, 0
    high[-1, 2], low[-1, 2] = 32, 16
    if seed == 2 and len(groups) > 1:
        low[1] = 0
    return WidthTables(BUDGETS, torch.stack([high, low]), "params", [g.layer for g in groups],
                       [g.intermediate_size for g in groups])


def nested_logits(model, groups, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The nested runtime at ``table``: flexc's op with width buffers on the full weights."""
    use_flexc_experts(model)
    for group, row in zip(groups, table):
        set_widths(model.get_submodule(group.path), row)
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Per family: the export folder, its tables, the source model, inputs and expected logits."""
    root = tmp_path_factory.mktemp("sliced")
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    out = {}
    for seed, family in enumerate(FAMILIES):
        model = tiny_model(family)
        groups = find_expert_groups(model)
        tables = random_nested_tables(groups, seed)
        state = {"width_budgets": tables.budgets, "width_tables": tables.tables, "width_metric": "params"}
        target = root / family
        target.mkdir()
        get_exporter("sliced")(ExportContext(target=target, spec=None, model=model, state=state))
        expected = {b: nested_logits(model, groups, tables.table(b), ids) for b in BUDGETS}
        for b, logits in expected.items():
            torch.save(logits, target / f"expected_{budget_key(b)}.pt")
        out[family] = dict(dir=target, tables=tables, model=model, groups=groups, expected=expected)
    torch.save(ids, root / "ids.pt")
    return root, ids, out


@pytest.mark.parametrize("family", FAMILIES)
def test_sliced_equals_nested_runtime_and_shrinks(exports, family):
    _, ids, out = exports
    e = out[family]
    sizes, params = [], []
    for b in BUDGETS:
        model, info = load_sliced(e["dir"], budget=b, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        with torch.no_grad():
            logits = model(ids).logits
        assert (logits - e["expected"][b]).abs().max().item() <= 1e-5
        manifest = json.loads((e["dir"] / budget_key(b) / MANIFEST_FILE).read_text())
        assert manifest["kind"] == "sliced" and manifest["budget"] == b
        assert manifest["widths"]["experts_removed"] > 0 and manifest["widths"]["experts_full"] > 0
        loaded = sum(p.numel() for p in model.parameters())
        assert loaded == manifest["params"]["total"]
        sizes.append(manifest["bytes"]["weights"])
        params.append(loaded)
        # the stored expert weights hold exactly the table's channels
        for group, row in zip(e["groups"], e["tables"].table(b)):
            experts = model.get_submodule(group.path)
            assert experts.widths == row.tolist()
            assert sum(experts.get_parameter(f"bucket_{i}_down").shape[0] * w for i, (w, _) in enumerate(experts.buckets)) == int(row.sum())
    full = sum(p.numel() for p in e["model"].parameters())
    assert params[1] < params[0] < full
    assert sizes[1] < sizes[0] < full * 4


def test_export_layout(exports):
    _, _, out = exports
    top = json.loads((out["qwen3_moe"]["dir"] / MANIFEST_FILE).read_text())
    assert top["kind"] == "sliced" and [r["keep"] for r in top["budgets"]] == BUDGETS
    folder = out["qwen3_moe"]["dir"] / budget_key(0.35)
    assert (folder / MODELING_FILE).is_file() and list(folder.glob("*.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_flexc_sliced.FlexcSlicedQwen3MoeForCausalLM"
    assert len(config["flexc_sliced"]["experts"]) == len(out["qwen3_moe"]["groups"])
    source = (folder / MODELING_FILE).read_text()
    assert "flexc." not in source.replace("flexc_sliced", "") and "import flexc" not in source


def test_load_errors_name_the_budgets(exports):
    _, _, out = exports
    directory = out["mixtral"]["dir"]
    with pytest.raises(BudgetError, match="0.7, 0.35"):
        load_sliced(directory)
    with pytest.raises(BudgetError, match="available budgets: 0.7, 0.35"):
        load_sliced(directory, budget=0.5)
    with pytest.raises(BudgetError, match="not 0.7"):
        load_sliced(directory / budget_key(0.35), budget=0.7)
    with pytest.raises(SlicedExportError, match="not a flexc sliced export"):
        load_sliced(directory.parent)


_REMOTE_CHECK = textwrap.dedent("""
    import importlib.abc, json, sys
    from pathlib import Path

    class NoFlexc(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "flexc" or name.startswith("flexc."):
                raise ImportError("flexc is blocked in this process")

    sys.meta_path.insert(0, NoFlexc())
    try:
        import flexc  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("flexc was importable")

    import torch
    from transformers import AutoModelForCausalLM

    root = Path(sys.argv[1])
    ids = torch.load(root / "ids.pt")
    worst = {}
    for folder in sorted(root.glob(f"*/{sys.argv[2]}")):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model(ids).logits
        expected = torch.load(folder.parent / f"expected_{folder.name}.pt")
        worst[f"{folder.parent.name}/{folder.name}"] = (logits - expected).abs().max().item()
    assert "flexc" not in sys.modules
    print(json.dumps(worst))
""")


def test_loads_with_trust_remote_code_without_flexc(exports, tmp_path):
    root, _, _ = exports
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    # The lower budget of every family (the other one is checked in-process above).
    args = [sys.executable, "-c", _REMOTE_CHECK, str(root), budget_key(BUDGETS[1])]
    proc = subprocess.run(args, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(worst) == len(FAMILIES)
    assert max(worst.values()) <= 1e-5, worst


def test_sliced_class_is_declared_incompatible_with_vllms_transformers_backend(exports):
    """vLLM's rule for running a remote-code class on its Transformers backend (its own fused MoE
    layers, which would ignore the slicing): ``is_backend_compatible()`` or
    ``_can_set_attn_implementation()``. Both must be False; flexc's plugin serves sliced checkpoints."""
    _, _, out = exports
    model = load_sliced(out[FAMILIES[0]]["dir"], budget=BUDGETS[1])
    assert type(model).__name__.startswith("FlexcSliced")
    assert type(model).is_backend_compatible() is False
    assert type(model)._can_set_attn_implementation() is False


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_generate_matches_nested_runtime(exports, family):
    _, ids, out = exports
    e = out[family]
    b = BUDGETS[1]
    sliced = load_sliced(e["dir"], budget=b)
    nested = e["model"]
    nested_logits(nested, e["groups"], e["tables"].table(b), ids[:, :1])  # set the nested widths
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    got = sliced.generate(ids[:, :6], **kwargs)
    want = nested.generate(ids[:, :6], **kwargs)
    assert got.shape == (2, 11)
    assert torch.equal(got, want)


def test_no_width_tables_is_a_clear_error(tmp_path):
    ctx = ExportContext(target=tmp_path, spec=None, model=tiny_model("olmoe"), state={})
    with pytest.raises(SlicedExportError, match="needs width tables.*pipeline"):
        get_exporter("sliced")(ctx)


def _toy_widths_pass():
    from flexc.passes.base import Pass, PassResult

    class ToySlicedWidths(Pass):
        """Chooses nested width tables without training."""

        name = "toy_sliced_widths"

        def run(self, graph, ctx):
            tables = random_nested_tables(graph.groups, seed=7)
            ctx.state.width_tables = tables
            return PassResult(graph=graph, modified=False)

    return ToySlicedWidths



def test_driver_writes_sliced_exports(moe_dir, tmp_path, monkeypatch):
    import flexc
    from flexc.passes import registry

    registry.available_passes()
    monkeypatch.setitem(registry._BUILTINS, "toy_sliced_widths", _toy_widths_pass())
    spec = {"model": {"path": str(moe_dir)}, "budgets": {"keep": BUDGETS},
            "pipeline": ["toy_sliced_widths"], "export": {"dir": str(tmp_path / "run"), "formats": ["sliced"]}}
    result = flexc.compile(spec, quiet=True)
    assert "export:sliced" in result.ran
    sliced = result.out_dir / "sliced"
    assert [r["dir"] for r in json.loads((sliced / MANIFEST_FILE).read_text())["budgets"]] == \
        [budget_key(b) for b in BUDGETS]
    model = load_sliced(sliced, budget=BUDGETS[1])
    assert (sliced / budget_key(BUDGETS[1]) / "tokenizer.json").is_file()
    ids = torch.randint(3, 97, (1, 7))
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(moe_dir)
    groups = find_expert_groups(base)
    tables = random_nested_tables(groups, seed=7)
    with torch.no_grad():
        got = model(ids).logits
    assert (got - nested_logits(base, groups, tables.table(BUDGETS[1]), ids)).abs().max().item() <= 1e-5


def test_driver_without_width_tables_fails_clearly(moe_dir, tmp_path):
    import flexc

    spec = {"model": {"path": str(moe_dir)}, "budgets": {"keep": BUDGETS},
            "export": {"dir": str(tmp_path / "run"), "formats": ["sliced"]}}
    with pytest.raises(flexc.SpecError, match="needs width tables"):  # refused before anything runs
        flexc.compile(spec, quiet=True)
    assert not (tmp_path / "run").exists()
