"""The driver: checkpoint + manifest for an empty pipeline, atomic writes, resume, --force rules."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import flexc
from flexc.compiler import artifacts
from flexc.compiler.errors import OutputDirError, SpecError
from flexc.ir.state import CompileState

sys.path.insert(0, str(Path(__file__).parent / "broken_specs"))
import compiler_helpers as helpers  # noqa: E402



@pytest.fixture
def toy_passes(monkeypatch):
    helpers.register_toy_passes(monkeypatch)
    monkeypatch.setattr(helpers.ToyRank, "calls", [])
    monkeypatch.setattr(helpers.ToyGate, "calls", [])
    monkeypatch.setattr(helpers.ToyGate, "fail", False)


def spec_dict(moe_dir: Path, out: Path, **extra) -> dict:
    return {"model": {"path": str(moe_dir)}, "budgets": {"keep": [0.75, 0.5]}, "export": {"dir": str(out)}, **extra}


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def stages(out: Path) -> dict[str, str]:
    return {s["name"]: s["status"] for s in manifest(out)["stages"]}


def test_empty_pipeline_writes_checkpoint_and_manifest(moe_dir, tmp_path):
    out = tmp_path / "run"
    result = flexc.compile(spec_dict(moe_dir, out), quiet=True)
    assert result.out_dir == out and result.ran == ["load", "checkpoint"]
    m = manifest(out)
    assert m["kind"] == "flexc-compile-run" and m["status"] == "complete"
    assert m["seed"] == 0 and m["versions"]["torch"] and m["versions"]["transformers"]
    assert m["model"]["family"] == "qwen3_moe"
    assert m["budgets"] == {"keep": [0.75, 0.5], "metric": "params"}
    assert all(s["status"] == "done" and s["seconds"] >= 0 for s in m["stages"])
    assert m["outputs"]["base"] == "base"
    assert (out / "compile.log").read_text().count("checkpoint done") == 1
    assert flexc.Spec.from_yaml(out / "spec.yaml").model.path == str(moe_dir)
    # the checkpoint is an ordinary Hugging Face model + tokenizer, equal to the source
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(out / "base")
    src = AutoModelForCausalLM.from_pretrained(moe_dir)
    for (n1, p1), (n2, p2) in zip(base.state_dict().items(), src.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert AutoTokenizer.from_pretrained(out / "base")("def f") is not None
    # nothing temporary is left behind (the lock file stays: see artifacts.LOCK_FILE)
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != artifacts.LOCK_FILE]


def test_rerun_is_up_to_date_and_a_different_spec_is_refused(moe_dir, tmp_path):
    out = tmp_path / "run"
    flexc.compile(spec_dict(moe_dir, out), quiet=True)
    again = flexc.compile(spec_dict(moe_dir, out), quiet=True)
    assert again.up_to_date and again.ran == []
    with pytest.raises(OutputDirError, match="different spec"):
        flexc.compile(spec_dict(moe_dir, out), seed=1, quiet=True)
    forced = flexc.compile(spec_dict(moe_dir, out), seed=1, force=True, quiet=True)
    assert forced.ran == ["load", "checkpoint"] and manifest(out)["seed"] == 1


def test_non_flexc_directory_is_never_overwritten(moe_dir, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputDirError, match="not a flexc run"):
        flexc.compile(spec_dict(moe_dir, out), quiet=True)
    assert (out / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    with pytest.raises(OutputDirError, match="no flexc manifest.json"):  # nor with force: flexc did not write it
        flexc.compile(spec_dict(moe_dir, out), force=True, quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_an_interrupted_checkpoint_leaves_no_partial_output(moe_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    out = tmp_path / "run"
    real_save = PreTrainedModel.save_pretrained

    def crash(self, directory, *a, **k):
        (Path(directory) / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        flexc.compile(spec_dict(moe_dir, out), quiet=True)
    assert not out.exists()  # no stage finished: the folder this run made is gone, half a file with it
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real_save)
    result = flexc.compile(spec_dict(moe_dir, out), quiet=True)
    assert result.ran == ["load", "checkpoint"]
    assert (out / "base" / "model.safetensors").stat().st_size > 1000
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != artifacts.LOCK_FILE]


def test_pipeline_runs_passes_and_resumes_after_the_last_completed_stage(moe_dir, tmp_path, toy_passes):
    out = tmp_path / "run"
    spec = spec_dict(moe_dir, out, pipeline=[{"toy_rank": {"score": "activation"}}, "toy_gate"])
    helpers.ToyGate.fail = True
    with pytest.raises(RuntimeError, match="on purpose"):
        flexc.compile(spec, quiet=True)
    assert stages(out) == {"load": "done", "lower": "done", "01-toy_rank": "done", "02-toy_gate": "failed"}
    assert manifest(out)["status"] == "failed"
    assert (out / "stages" / "01-toy_rank" / "scores.txt").read_text() == "ok"
    assert helpers.ToyRank.calls == ["toy_rank"]

    helpers.ToyGate.fail = False
    result = flexc.compile(spec, quiet=True)
    assert helpers.ToyRank.calls == ["toy_rank"], "a completed stage ran again"
    assert helpers.ToyGate.calls == ["toy_gate", "toy_gate"]
    assert result.skipped == ["01-toy_rank"] and result.ran == ["load", "lower", "02-toy_gate"]
    m = manifest(out)
    assert m["status"] == "complete" and all(s["status"] == "done" for s in m["stages"])
    assert m["stages"][-1]["properties"] == ["lowered", "toy_gated", "toy_ranked"]
    # the saved state holds the gated widths and the passes' hand-off state (tensors included)
    state = CompileState.load(out / "state")
    assert state.extras["gated"] is True and torch.equal(state.extras["toy_scores"]["layer0"], torch.arange(4.0))
    saved = json.loads((out / "state" / "stage.json").read_text())
    assert saved == {"stage": "02-toy_gate"}


@pytest.mark.parametrize("before", ["absent", "empty"])
def test_a_run_that_finished_no_stage_leaves_nothing(moe_dir, tmp_path, toy_passes, monkeypatch, before):
    out = tmp_path / "run"
    if before == "empty":
        out.mkdir()
    spec = spec_dict(moe_dir, out, pipeline=[{"toy_rank": {"score": "activation"}}])

    def fail(self, graph, ctx):
        (ctx.workdir / "scores.txt").write_text("half")
        raise RuntimeError("toy_rank failed on purpose")

    monkeypatch.setattr(helpers.ToyRank, "run", fail)
    with pytest.raises(RuntimeError, match="on purpose"):
        flexc.compile(spec, quiet=True)
    if before == "absent":
        assert not out.exists()
    else:  # the user's folder stays, as empty as it was
        assert out.is_dir() and [p.name for p in out.iterdir()] == []


def test_a_failed_stage_with_a_training_checkpoint_is_kept_to_resume(moe_dir, tmp_path, toy_passes, monkeypatch):
    out = tmp_path / "run"
    spec = spec_dict(moe_dir, out, pipeline=[{"toy_rank": {"score": "activation"}}])

    def fail(self, graph, ctx):
        (ctx.workdir / "anneal_checkpoint.pt").write_bytes(b"step 500 of 1000")
        raise KeyboardInterrupt

    monkeypatch.setattr(helpers.ToyRank, "run", fail)
    with pytest.raises(KeyboardInterrupt):
        flexc.compile(spec, quiet=True)
    assert (out / "stages" / "01-toy_rank" / "anneal_checkpoint.pt").is_file()
    assert stages(out)["01-toy_rank"] == "interrupted"


def test_pass_state_round_trip_and_refusal(tmp_path):
    extras = {"a": torch.ones(2, 3), "b": [1, 2.5, "x", None, {"c": torch.zeros(1, dtype=torch.int32)}], "d": True}
    CompileState(extras=extras).save(tmp_path)
    back = CompileState.load(tmp_path).extras
    assert torch.equal(back["a"], extras["a"]) and back["b"][:4] == [1, 2.5, "x", None]
    assert back["b"][4]["c"].dtype == torch.int32 and back["d"] is True
    with pytest.raises(TypeError, match="cannot be saved"):
        CompileState(extras={"bad": object()}).save(tmp_path)


def test_python_api_errors_are_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="model directory not found"):
        flexc.compile({"model": {"path": str(tmp_path / "nope")}}, out=tmp_path / "o")
    with pytest.raises(SpecError, match="unknown key 'sed'"):
        flexc.compile({"model": {"zoo": "tiny"}}, sed=3, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_overrides_and_default_output_dir(moe_dir, tmp_path, monkeypatch):
    from flexc.compiler.driver import output_dir, prepare_spec

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "exp.yaml"
    path.write_text(f"model: {{path: {moe_dir}}}\nseed: 1\n")
    spec, source = prepare_spec(path, {"seed": 5, "budgets__keep": [0.5]})
    assert spec.seed == 5 and spec.budgets.keep == [0.5] and source == path
    assert output_dir(spec, source, None) == Path("runs/exp")
    assert output_dir(spec, None, None) == Path("runs/flexc")
