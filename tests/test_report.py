"""report.md: written by every compile, with budgets, sizes, perplexity and stage times."""

import json

import torch

import flexc
from flexc.export.tables import WidthTables
from flexc.ir.state import CompileState


def test_compile_writes_a_report_with_measured_budgets(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    data = {"builtin": "python-stdlib", "num_samples": 8, "seq_len": 64, "batch_size": 4}
    spec = {
        "model": {"path": str(tiny_model_dir)},
        "data": {"calibration": {**data, "split": "train"}, "evaluation": {**data, "split": "heldout"}},
        "budgets": {"keep": [0.75, 0.5]},
        "pipeline": [{"rank_channels": {"score": "activation", "plot": False}}, "uniform", "fold_masks"],
        "export": {"formats": ["nested", "graph", "hf"]},
    }
    flexc.compile(spec, out=out, quiet=True)
    text = (out / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 0.") or line.startswith("| 1 ")]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "0.75", "0.5"]
    ppl = [float(r.split("|")[7]) for r in rows]
    assert all(p > 1 for p in ppl) and ppl[0] < ppl[2]  # halving every expert costs perplexity

    # the figures agree with the nested artifact's manifest and a direct evaluation
    manifest = json.loads((out / "nested" / "flexc_manifest.json").read_text())
    for r, b in zip(rows[1:], manifest["budgets"]):
        assert float(r.split("|")[2]) == round(b["keep_achieved"], 3)
    model = flexc.load(out / "nested", budget=0.5)
    from transformers import AutoTokenizer

    from flexc.compiler.spec import DataSource
    from flexc.eval.perplexity import evaluate

    tok = AutoTokenizer.from_pretrained(out / "nested")
    direct = evaluate(model, tok, DataSource(**{**data, "split": "heldout"})).perplexity
    assert abs(direct - ppl[2]) < 0.01 * ppl[2]
    assert "torch.ops.flexc.moe_experts" in (out / "graph" / "graph.py").read_text()  # folded: plain op nodes
    assert (out / "graph" / "graph.svg").stat().st_size > 1000
    assert (out / "report" / "widths.png").stat().st_size > 3000
    assert (out / "report" / "quality.png").stat().st_size > 3000
    assert "## Time per stage" in text and "| 03-fold_masks | done |" in text
    assert "- **width tables**: chosen by `uniform`" in text  # the compile state's record of the choice
    assert json.loads((out / "manifest.json").read_text())["outputs"]["report"] == "report.md"
    # hf: the compiled (ranked) weights at full width, a plain checkpoint
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out / "hf")
    ids = tok("def main():\n    return 0\n", return_tensors="pt")["input_ids"]
    model.set_budget(1.0)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    nested_weights = AutoModelForCausalLM.from_pretrained(out / "nested").state_dict()
    for name, tensor in plain.state_dict().items():  # the ranked weights, not the original order
        assert torch.equal(tensor, nested_weights[name]), name
    assert (out / "hf" / "tokenizer.json").is_file()
    # the nested export holds the tables the pipeline chose (the run's saved compile state)
    chosen = CompileState.load(out / "state").width_tables
    nested = WidthTables.load(out / "nested" / "flexc_widths.safetensors")
    assert torch.equal(nested.tables, chosen.tables) and nested.budgets == chosen.budgets


def test_hf_export_refuses_whole_expert_pruning(tmp_path):
    import logging

    import pytest

    from flexc.compiler.exporters import ExportContext, get_exporter

    ctx = ExportContext(target=tmp_path, spec=None, model=None, state={"expert_masks": torch.tensor([[True, False]])},
                        logger=logging.getLogger("test"))
    with pytest.raises(ValueError, match="removed whole experts"):
        get_exporter("hf")(ctx)


def test_report_says_how_each_annealed_table_was_chosen(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    # 4 batches: the default validation share holds one out, so each trained table is checked
    data = {"builtin": "python-stdlib", "num_samples": 16, "seq_len": 64, "batch_size": 4, "split": "train"}
    spec = {"model": {"path": str(tiny_model_dir)}, "data": {"calibration": data}, "budgets": {"keep": [0.75, 0.5]},
            "pipeline": [{"rank_channels": {"score": "activation", "plot": False}}, "insert_action_gates",
                         {"anneal": {"steps": 16}}]}
    flexc.compile(spec, out=out, quiet=True)
    text = (out / "report.md").read_text()
    assert "- **width tables**: chosen by `anneal`" in text
    assert "### How each table was chosen" in text and "stages/03-anneal/width_tables.json" in text
    recorded = json.loads((out / "stages" / "03-anneal" / "width_tables.json").read_text())["budgets"]
    for b in recorded:  # one row per budget, with the pass's own account of it
        row = next(line for line in text.splitlines() if line.startswith(f"| {b['keep_target']:g} | {b['how']} | "))
        assert f"| {b['exported_at_step']} |" in row
        for name, loss in b.get("validation_loss", {}).items():  # every candidate's held-out loss
            assert f"{name.replace('_', ' ')} {loss:.4g}" in row
        if "validation_difference" in b:
            diff = b["validation_difference"]
            assert f"{diff['mean']:+.3g} ± {diff['standard_error']:.2g}" in row
    assert any("validation_difference" in b for b in recorded), recorded


def test_the_adaptive_lines_say_which_rule_or_the_static_table_each_budget_runs():
    from flexc.compiler.report import _adaptive_lines

    def row(policy, adaptive_loss):
        return {"policy": policy, "adaptive_loss": adaptive_loss, "static_loss": 4.70, "adaptive_keep": 0.72,
                "static_keep": 0.72}

    policy = {"rule": "auto", "target": "table", "report": {
        "budgets": {"0.5": {"target_keep": 0.719}, "0.25": {"target_keep": 0.347}},
        "held_out": {"0.5": row("scores", 4.64), "0.25": row("static (every adaptive rule lost on held-out text)",
                                                               4.75)}}}
    lines = _adaptive_lines(policy)
    assert "keep 0.5:" in lines[1] and "better; runs rule `scores`" in lines[1]
    assert "keep 0.25:" in lines[2] and "worse; runs the static table (every adaptive rule lost" in lines[2]
