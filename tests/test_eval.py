"""Held-out perplexity: exact token counts, hand computations, no leakage, graphs == models."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flexc.compiler.spec import DataSource
from flexc.data.calibration import DataError
from flexc.eval import check_no_leak, evaluate, evaluation_stream
from flexc.ir.testing import tiny_model

V = 97


class ConstantLM(nn.Module):
    """Predicts the same distribution everywhere: perplexity has a closed form."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1 + ord(c) % (V - 1) for c in t] for t in texts]}


def source(**kw):
    return SimpleNamespace(seq_len=kw.pop("seq_len", 8), batch_size=kw.pop("batch_size", 2), **kw)


def test_constant_model_matches_closed_form():
    torch.manual_seed(0)
    logits = torch.randn(V)
    stream = torch.randint(0, V, (29,))
    seq_len = 8  # windows of 8, 8, 8, 5: targets 7 + 7 + 7 + 4
    result = evaluate(ConstantLM(logits), None, source(seq_len=seq_len), stream=stream)
    assert result.tokens == 25 == 29 - math.ceil(29 / seq_len)
    logp = F.log_softmax(logits, dim=-1)
    targets = [int(stream[i]) for i in range(29) if i % seq_len != 0]
    expected = -sum(float(logp[t]) for t in targets) / len(targets)
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-6)


def test_tiny_model_matches_window_by_window_hand_computation():
    model = tiny_model("qwen3_moe")
    stream = torch.randint(0, V, (45,), generator=torch.Generator().manual_seed(1))
    result = evaluate(model, None, source(seq_len=16, batch_size=2), stream=stream)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 45, 16):  # each window alone, every position scored by hand
            window = stream[start:start + 16]
            logp = F.log_softmax(model(input_ids=window[None]).logits[0].double(), dim=-1)
            for i in range(1, window.numel()):
                nll -= float(logp[i - 1, window[i]])
                count += 1
    assert result.tokens == count == 45 - 3
    assert result.loss == pytest.approx(nll / count, rel=1e-5)


def test_graph_and_budget_evaluate_like_the_model():
    from flexc.eval import apply_budget
    from flexc.ir import lower

    model = tiny_model("qwen3_moe")
    stream = torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(2))
    src = source(seq_len=10, batch_size=4)
    base = evaluate(model, None, src, stream=stream)
    graph = lower(model)
    assert evaluate(graph, None, src, stream=stream).loss == pytest.approx(base.loss, rel=1e-5)
    state = {"width_budgets": torch.tensor([0.5]), "width_tables": torch.full((1, 2, 8), 16, dtype=torch.int32)}
    apply_budget(graph, state, 0.5)
    pruned = evaluate(graph, None, src, stream=stream)
    apply_budget(graph, state, None)
    assert pruned.tokens == base.tokens and pruned.loss != pytest.approx(base.loss, rel=1e-4)
    assert evaluate(graph, None, src, stream=stream).loss == pytest.approx(base.loss, rel=1e-5)


def test_stream_reads_whole_documents_in_order_and_stops_at_the_limit(tmp_path):
    docs = ["abc", "defgh", "ij", "klmnopqrst"]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    src = DataSource(files=[str(path)], num_samples=2, seq_len=6)
    stream = evaluation_stream(src, CharTokenizer())
    tok = CharTokenizer()
    full = []
    for d in docs:
        full += tok([d])["input_ids"][0] + [0]
    assert stream.tolist() == full[:12]  # num_samples * seq_len tokens, documents in file order
    assert evaluation_stream(src, tok, limit_tokens=1000).tolist() == full


def test_leaks_across_the_split_are_refused(tmp_path):
    calib = DataSource(builtin="python-stdlib", split="train")
    check_no_leak(calib, DataSource(builtin="python-stdlib"))  # default evaluation split: heldout
    with pytest.raises(DataError, match="same split"):
        check_no_leak(calib, DataSource(builtin="python-stdlib", split="train"))
    f = tmp_path / "a.txt"
    f.write_text("x")
    with pytest.raises(DataError, match="shares files"):
        check_no_leak(DataSource(files=[str(f)]), DataSource(files=[str(f)]))


def test_builtin_heldout_documents_are_not_in_train():
    from flexc.data.corpus import stdlib_documents

    train = {d.name for d in stdlib_documents("train")}
    assert not train & {d.name for d in stdlib_documents("heldout")}


def test_methods_parse_and_flexmoe_runs_last():
    from flexc.passes.methods import parse_methods

    methods = parse_methods("flexmoe, uniform,expert_prune:reap")
    assert [m.label for m in methods] == ["uniform", "expert_prune:reap", "flexmoe"]
    assert methods[1].passes == [("expert_prune", {"criterion": "reap"})]
    assert [p for p, _ in methods[2].passes] == ["insert_action_gates", "anneal"]
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("random")
    with pytest.raises(Exception, match="criterion"):
        parse_methods("expert_prune:nope")


def test_compare_table_and_plot(tmp_path):
    from flexc.compiler.compare import markdown_table, plot

    rows = [{"method": "unpruned", "keep_target": 1.0, "params_keep": 1.0, "ppl": 10.0}]
    for m, k in (("uniform", 1.2), ("coverage", 1.1)):
        rows += [{"method": m, "keep_target": b, "params_keep": b - 0.01, "ppl": 10 * k / b} for b in (0.75, 0.5)]
    text = markdown_table(rows)
    assert "| uniform | 16.000 | 24.000 |" in text and "unpruned: 10.000" in text
    plot(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 5000


def test_eval_cli_on_a_base_model(tiny_model_dir, tmp_path):
    from flexc.cli import main

    out = tmp_path / "r.json"
    assert main(["eval", str(tiny_model_dir), "--samples", "2", "--seq-len", "32", "--json", str(out), "-q"]) == 0
    (row,) = json.loads(out.read_text())["perplexity"]
    assert row["tokens"] == 2 * 31 and row["budget"] == 1.0 and 1 < row["perplexity"] < 2000
    assert main(["eval", str(tiny_model_dir), "--budget", "0.5", "-q"]) == 2  # budgets need an artifact



def test_compare_reuses_the_width_tables_of_a_finished_compile(tiny_model_dir, tmp_path, monkeypatch):
    import flexc
    from flexc.compiler.compare import compare, load_spec_or_run, reusable_run
    from flexc.passes.methods import parse_methods
    from flexc.passes.anneal import Anneal

    def make(steps):
        data = {"builtin": "python-stdlib", "num_samples": 4, "seq_len": 32, "batch_size": 2}
        return flexc.Spec(model={"zoo": "tiny"},
                          data={"calibration": data, "evaluation": {**data, "split": "heldout"}},
                          budgets={"keep": [0.75, 0.5]}, export={"dir": str(tmp_path / "run")},
                          pipeline=[{"rank_channels": {"plot": False}}, {"insert_action_gates": {"granule": 16}},
                                    {"anneal": {"steps": steps}}, "fold_masks"])

    spec = make(4)
    flexc.compile(spec, quiet=True)
    loaded, run = load_spec_or_run(tmp_path / "run")  # a run directory stands for its spec
    assert run == tmp_path / "run" and loaded.fingerprint() == spec.fingerprint()

    def no_anneal(self, graph, ctx):
        raise AssertionError("compare annealed again")

    monkeypatch.setattr(Anneal, "run", no_anneal)
    result = compare(spec, parse_methods("flexmoe,uniform", spec), tmp_path / "cmp", quiet=True)
    assert list(result["reused"]) == ["flexmoe"]
    tables = json.loads((tmp_path / "run" / "stages" / "03-anneal" / "width_tables.json").read_text())
    rows = [r for r in result["results"] if r["method"] == "flexmoe"]
    assert [r["keep"] for r in rows] == pytest.approx([b["keep_achieved"] for b in tables["budgets"]])

    other = make(5)  # other anneal options: the compile's tables are not what compare would compute
    assert reusable_run(other, tmp_path / "run") is None
    with pytest.raises(AssertionError, match="annealed again"):
        compare(other, parse_methods("flexmoe", other), tmp_path / "cmp2", quiet=True)
    nowhere = flexc.Spec.model_validate({**other.to_dict(), "export": {}})  # no export.dir: nothing to reuse
    with pytest.raises(AssertionError, match="annealed again"):
        compare(nowhere, parse_methods("flexmoe", nowhere), tmp_path / "cmp3", quiet=True)

    from flexc.compiler.integrity import RunIntegrityError

    tables_file = tmp_path / "run" / "stages" / "03-anneal" / "width_tables.safetensors"
    tables_file.write_bytes(tables_file.read_bytes()[:-1] + b"\x01")  # one byte edited since the compile
    with pytest.raises(RunIntegrityError, match=f"{tables_file}: changed since stage 03-anneal wrote it"):
        reusable_run(spec, tmp_path / "run")


def test_compare_scores_each_held_out_checks_candidates_on_the_evaluation_text(tiny_model_dir, tmp_path):
    import flexc
    from flexc.compiler.compare import compare
    from flexc.passes.methods import parse_methods

    data = {"builtin": "python-stdlib", "num_samples": 16, "seq_len": 32, "batch_size": 4}
    spec = flexc.Spec(model={"zoo": "tiny"},
                      data={"calibration": data, "evaluation": {**data, "num_samples": 8, "split": "heldout"}},
                      budgets={"keep": [0.75, 0.5]},
                      pipeline=[{"rank_channels": {"plot": False}}, {"insert_action_gates": {"granule": 16}},
                                {"anneal": {"steps": 8, "lr": 0.5, "selection": {"samples": 8}}}])
    result = compare(spec, parse_methods("flexmoe", spec), tmp_path / "cmp", quiet=True)
    rows = result["held_out_check"]["flexmoe"]
    assert [r["keep_target"] for r in rows] == [0.75, 0.5]  # the check ran at both budgets (trained != warm start)
    measured = {r["keep_target"]: r["loss"] for r in result["results"] if r["method"] == "flexmoe"}
    records = {b["keep_target"]: b for b in json.loads(
        (tmp_path / "cmp" / "work" / "flexmoe" / "width_tables.json").read_text())["budgets"]}
    for r in rows:
        b = r["keep_target"]
        # The chosen candidate is the exported table: its evaluation loss is the method's row.
        assert r["evaluation"][r["chosen"]]["loss"] == pytest.approx(measured[b], rel=1e-6)
        assert {n: c["loss"] for n, c in r["check"].items()} == records[b]["validation_loss"]
        ppl = {n: e["ppl"] for n, e in r["evaluation"].items()}
        assert r["best"] == min(ppl, key=ppl.get) and r["regret"] == pytest.approx(ppl[r["chosen"]] - min(ppl.values()))
        # Different tables were evaluated: the trained one and its fallback score differently on the evaluation text.
        assert abs(r["evaluation_difference"]) > 1e-4
        assert r["agree"] == {"loss": (r["check_loss_difference"] < 0) == (r["evaluation_difference"] < 0),
                              "next_token": (r["check_difference"] < 0) == (r["evaluation_difference"] < 0)}
    assert "held-out check against the evaluation text" in (tmp_path / "cmp" / "compare.md").read_text()


@pytest.mark.parametrize("entry, where", [
    ("{rank_channels: {score: 'evilscore:Score'}}", r"pipeline\[0\].rank_channels.score: 'evilscore:Score'"),
    ("{name: 'evilscore:Score'}", r"pipeline\[0\].name: 'evilscore:Score'"),
])
def test_compare_of_a_run_directory_imports_no_code_it_names(entry, where, tiny_model_dir, tmp_path, monkeypatch):
    from flexc.compiler.artifacts import MANIFEST_KIND
    from flexc.compiler.compare import load_spec_or_run
    from flexc.compiler.errors import FlexcError

    sentinel = tmp_path / "imported"
    (tmp_path / "evilscore.py").write_text(f"import pathlib\npathlib.Path({str(sentinel)!r}).touch()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"kind": MANIFEST_KIND, "stages": []}))
    (run / "spec.yaml").write_text("model: {zoo: tiny}\ndata:\n  calibration: {builtin: python-stdlib}\n"
                                   f"pipeline: [{entry}]\n")
    with pytest.raises(FlexcError, match=where + " is code named by a run directory"):
        load_spec_or_run(run)
    assert not sentinel.exists()


def test_compare_shows_every_method_after_one_recovery(tiny_model_dir, tmp_path):
    """``--recover``: rows ``METHOD+recover`` after one recover on each method's tables, better than the
    method alone where it trained; the weights are put back, so the next method's rows are unchanged."""
    import flexc
    from flexc.cli import main
    from flexc.compiler.compare import compare
    from flexc.passes.methods import parse_methods

    data = {"builtin": "python-stdlib", "num_samples": 8, "seq_len": 64, "batch_size": 4}
    spec = flexc.Spec(model={"zoo": "tiny"}, data={"calibration": data, "evaluation": {**data, "split": "heldout"}},
                      budgets={"keep": [0.75, 0.5]},
                      pipeline=[{"rank_channels": {"plot": False}}, "coverage",
                                {"recover": {"keep": 0.5, "steps": 8, "lr": 5e-3}}])
    plain = compare(spec, parse_methods("uniform,coverage", spec), tmp_path / "plain", quiet=True)
    both = compare(spec, parse_methods("uniform,coverage", spec), tmp_path / "both", quiet=True, recover=True)
    ppl = {(r["method"], r["keep_target"]): r["ppl"] for r in both["results"]}
    assert {m for m, _ in ppl} == {"unpruned", "uniform", "uniform+recover", "coverage", "coverage+recover"}
    for r in plain["results"]:  # every method from the same model: as without --recover
        assert ppl[r["method"], r["keep_target"]] == pytest.approx(r["ppl"], rel=1e-6)
    for method in ("uniform", "coverage"):
        assert ppl[f"{method}+recover", 0.5] < ppl[method, 0.5]  # the budget it fine-tuned at
    assert "uniform+recover" in (tmp_path / "both" / "compare.md").read_text()
    (tmp_path / "spec.yaml").write_text(spec.to_yaml())  # the command line's flag
    assert main(["compare", str(tmp_path / "spec.yaml"), "--methods", "uniform", "--recover", "--out",
                 str(tmp_path / "cli"), "-q"]) == 0
    rows = json.loads((tmp_path / "cli" / "compare.json").read_text())["results"]
    assert {r["method"] for r in rows} == {"unpruned", "uniform", "uniform+recover"}


def test_compare_puts_quantize_after_every_method_and_its_recover(tiny_model_dir, tmp_path):
    """``--quantize``: rows ``METHOD+w4a16-g32-rtn`` (and after recover) near the method's own; the weights are
    put back, so every method's own rows are what they are without it; a grid the groups do not divide is
    refused before anything runs."""
    from types import SimpleNamespace

    import flexc
    from flexc.cli import main
    from flexc.compiler.compare import compare, parse_quantize
    from flexc.passes.methods import parse_methods

    data = {"builtin": "python-stdlib", "num_samples": 8, "seq_len": 64, "batch_size": 4}
    spec = flexc.Spec(model={"zoo": "tiny"}, data={"calibration": data, "evaluation": {**data, "split": "heldout"}},
                      budgets={"keep": [0.75, 0.5], "grid": 32},
                      pipeline=[{"rank_channels": {"plot": False}}, "coverage",
                                {"recover": {"keep": 0.5, "steps": 4, "lr": 5e-3}}])
    plain = compare(spec, parse_methods("uniform,coverage", spec), tmp_path / "plain", quiet=True)
    quantize = parse_quantize("w4a16:rtn:32", spec)
    both = compare(spec, parse_methods("uniform,coverage", spec), tmp_path / "both", quiet=True, recover=True,
                   quantize=quantize)
    ppl = {(r["method"], r["keep_target"]): r["ppl"] for r in both["results"]}
    assert {m for m, _ in ppl} == {"unpruned", "uniform", "uniform+w4a16-g32-rtn", "uniform+recover",
                                   "uniform+recover+w4a16-g32-rtn", "coverage", "coverage+w4a16-g32-rtn",
                                   "coverage+recover", "coverage+recover+w4a16-g32-rtn"}
    for r in plain["results"]:
        assert ppl[r["method"], r["keep_target"]] == pytest.approx(r["ppl"], rel=1e-6)
    for method in ("uniform", "coverage", "uniform+recover", "coverage+recover"):
        for b in (0.75, 0.5):
            quantized = ppl[f"{method}+w4a16-g32-rtn", b]
            assert quantized != ppl[method, b] and abs(quantized / ppl[method, b] - 1) < 0.03
    with pytest.raises(ValueError, match="budgets.grid is 'auto': set it to a multiple of 128"):
        parse_quantize("w4a16", SimpleNamespace(pipeline=[], budgets=SimpleNamespace(grid="auto")))
    with pytest.raises(ValueError, match="method: Input should be 'gptq' or 'rtn'"):
        parse_quantize("w4a16:fast:32", spec)
    (tmp_path / "spec.yaml").write_text(spec.to_yaml())
    assert main(["compare", str(tmp_path / "spec.yaml"), "--methods", "uniform", "--quantize", "w8a16:rtn:32",
                 "--out", str(tmp_path / "cli"), "-q"]) == 0
    rows = json.loads((tmp_path / "cli" / "compare.json").read_text())["results"]
    assert {r["method"] for r in rows} == {"unpruned", "uniform", "uniform+w8a16-g32-rtn"}
