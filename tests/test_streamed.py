"""Streamed compile (``execution: {stream: layers}``) == in-memory compile, one decoder layer at a time.

Each family's tiny checkpoint (random weights, saved by transformers in its on-disk layout) is
compiled twice with rank_channels (activation, weight_activation or taylor scores) -> coverage -> fold_masks -> nested + sliced:
in memory and streamed. The width tables must be identical and every exported tensor equal
within 1e-6; the streamed run must never hold more than one decoder layer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent / "broken_specs"))
import compiler_helpers  # noqa: E402

import flexc  # noqa: E402
from flexc.compiler.errors import SpecError  # noqa: E402
from flexc.compiler.spec import Spec  # noqa: E402
from flexc.ir.tables import WIDTHS_FILE, WidthTables  # noqa: E402

FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe")  # qwen2_moe: with its shared expert


def _spec(model_dir: Path, out: Path, stream: str, score: str = "activation", **extra) -> dict:
    spec = {
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"calibration": {"builtin": "python-stdlib", "num_samples": 6, "seq_len": 24, "batch_size": 4}},
        "budgets": {"keep": [0.75, 0.5]},
        "pipeline": [{"rank_channels": {"score": score, "plot": False}}, {"coverage": {"granule": 8}},
                     "fold_masks"],
        "export": {"dir": str(out), "formats": ["nested", "sliced"]},
        "execution": {"stream": stream},
    }
    spec.update(extra)
    return spec


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        if f.name == WIDTHS_FILE:
            continue
        with safe_open(str(f), framework="pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def _assert_same_weights(a: Path, b: Path, atol: float = 1e-6) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta and set(ta) == set(tb), sorted(set(ta) ^ set(tb))[:5]
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
        diff = float((ta[name].double() - tb[name].double()).abs().max()) if ta[name].numel() else 0.0
        assert diff <= atol, f"{a.name}/{name}: max difference {diff:.3g}"


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-models")
    return {f: compiler_helpers.make_tiny_moe(root / f, family=f) for f in FAMILIES}


def _spy_layer_models(monkeypatch) -> list:
    from flexc.ir import streaming

    models = []
    original = streaming.LayerModel.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        models.append(self)

    monkeypatch.setattr(streaming.LayerModel, "__init__", spy)
    return models


@pytest.mark.parametrize("family, score", [(f, "activation") for f in FAMILIES] + [("qwen3_moe", "weight_activation")]
                         + [(f, "taylor") for f in FAMILIES])
def test_streamed_equals_in_memory(family, score, family_dirs, tmp_path, monkeypatch):
    models = _spy_layer_models(monkeypatch)
    flexc.compile(_spec(family_dirs[family], tmp_path / "mem", "off", score), quiet=True)
    assert not models  # the in-memory path never streams
    flexc.compile(_spec(family_dirs[family], tmp_path / "stream", "layers", score), quiet=True)
    (lm,) = models

    mem, stream = tmp_path / "mem", tmp_path / "stream"
    t_mem, t_stream = WidthTables.load(mem / "nested" / WIDTHS_FILE), WidthTables.load(stream / "nested" / WIDTHS_FILE)
    assert t_mem.budgets == t_stream.budgets
    assert torch.equal(t_mem.tables, t_stream.tables)
    assert bool((t_mem.tables < t_mem.full_table()).any())  # the tables actually prune something
    _assert_same_weights(mem / "nested", stream / "nested")
    for key in ("keep_0.75", "keep_0.50"):
        _assert_same_weights(mem / "sliced" / key, stream / "sliced" / key)
    # Counted on the modules: one decoder layer with real tensors at a time, every layer visited
    # (rank_channels once, twice with the backward of a gradient score; the nested export once,
    # the sliced export once per budget).
    assert lm.peak_live == 1
    assert lm.materialised_count == lm.num_layers * ((2 if score == "taylor" else 1) + 1 + 2)
    assert lm.live_layers() == []


def test_streamed_artifacts_load(family_dirs, tmp_path):
    """The streamed artifacts load with flexc (nested at a budget, a sliced folder) and run."""
    flexc.compile(_spec(family_dirs["qwen3_moe"], tmp_path / "s", "layers"), quiet=True)
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    nested = flexc.load(tmp_path / "s" / "nested", budget=0.5)
    sliced = flexc.load(tmp_path / "s" / "sliced", budget=0.5)
    with torch.no_grad():
        a = nested(input_ids=ids).logits
        b = sliced(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_streamed_hf_export_equals_in_memory(family_dirs, tmp_path):
    """The streamed ``hf`` export (the ranked full-width checkpoint, a layer at a time) holds the in-memory
    export's tensors and loads with plain transformers to the same logits."""
    from transformers import AutoModelForCausalLM

    for mode in ("off", "layers"):
        spec = _spec(family_dirs["qwen2_moe"], tmp_path / mode, mode)
        spec["export"]["formats"] = ["hf"]
        flexc.compile(spec, quiet=True)
    _assert_same_weights(tmp_path / "off" / "hf", tmp_path / "layers" / "hf")
    assert not list((tmp_path / "layers" / "hf").glob("flexc_*"))  # a plain checkpoint: no widths, no flexc code
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    logits = []
    for mode in ("off", "layers"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / mode / "hf", dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_streamed_resumes_after_a_failed_export(family_dirs, tmp_path, monkeypatch):
    """A run that fails in an export resumes after its last completed pass, from state/ alone
    (which holds no weights), and writes what an uninterrupted run writes."""
    import flexc.export.streamed as streamed_export

    spec = _spec(family_dirs["qwen3_moe"], tmp_path / "r", "layers")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full (on purpose)")

    with monkeypatch.context() as m:
        m.setattr(streamed_export, "export_sliced_streamed", broken)
        with pytest.raises(RuntimeError, match="on purpose"):
            flexc.compile(spec, quiet=True)
    state_bytes = sum(f.stat().st_size for f in (tmp_path / "r" / "state").iterdir())
    assert state_bytes < 100_000  # scores, permutations, tables: no weights
    again = flexc.compile(spec, quiet=True)
    assert {"01-rank_channels", "02-coverage", "03-fold_masks", "export:nested"} <= set(again.skipped)
    assert again.ran == ["load", "export:sliced"]
    flexc.compile(_spec(family_dirs["qwen3_moe"], tmp_path / "clean", "layers"), quiet=True)
    for key in ("keep_0.75", "keep_0.50"):
        _assert_same_weights(tmp_path / "clean" / "sliced" / key, tmp_path / "r" / "sliced" / key)
    assert flexc.compile(spec, quiet=True).up_to_date


def test_streamed_pass_failure_is_noted_and_resumes_after_the_last_completed_pass(family_dirs, tmp_path,
                                                                                 monkeypatch):
    """The streamed passes run through PassRunner: a failure names the pass and those before it, and
    the re-run starts at the failed pass with the properties of the passes that completed."""
    from flexc.passes.baselines import Coverage

    spec = _spec(family_dirs["qwen3_moe"], tmp_path / "p", "layers")

    def broken(self, graph, ctx):
        raise RuntimeError("coverage failed (on purpose)")

    with monkeypatch.context() as m:
        m.setattr(Coverage, "run", broken)
        with pytest.raises(RuntimeError, match="on purpose") as err:
            flexc.compile(spec, quiet=True)
    assert "in pass 'coverage', after 'rank_channels'" in "".join(err.value.__notes__)
    again = flexc.compile(spec, quiet=True)
    assert again.skipped == ["01-rank_channels"]
    assert again.ran == ["load", "02-coverage", "03-fold_masks", "export:nested", "export:sliced"]
    flexc.compile(_spec(family_dirs["qwen3_moe"], tmp_path / "clean", "layers"), quiet=True)
    for key in ("keep_0.75", "keep_0.50"):
        _assert_same_weights(tmp_path / "clean" / "sliced" / key, tmp_path / "p" / "sliced" / key)


ANNEAL = [{"rank_channels": {"score": "activation", "plot": False}}, {"insert_action_gates": {"granule": 8}},
          {"anneal": {"steps": 6, "checkpoint_every": 1, "selection": {"samples": 8}}}, "fold_masks"]


def _killed_then_resumed(spec: dict, pass_cls, hook, monkeypatch):
    """Compile ``spec`` with ``hook`` as the training pass's ``on_step`` (it raises KeyboardInterrupt), then
    again without it: the resumed compile's result."""
    with monkeypatch.context() as m:
        m.setattr(pass_cls, "on_step", hook)
        with pytest.raises(KeyboardInterrupt):
            flexc.compile(spec, quiet=True)
    return flexc.compile(spec, quiet=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_anneal_equals_in_memory(family, family_dirs, tmp_path, monkeypatch):
    """The gates trained through the layer-streamed model (a forward sweep and a recomputing backward
    sweep every step) choose the same tables as in memory, with one decoder layer at a time."""
    import json

    models = _spy_layer_models(monkeypatch)
    flexc.compile(_spec(family_dirs[family], tmp_path / "mem", "off", pipeline=ANNEAL), quiet=True)
    flexc.compile(_spec(family_dirs[family], tmp_path / "stream", "layers", pipeline=ANNEAL), quiet=True)
    (lm,) = models

    mem, stream = tmp_path / "mem", tmp_path / "stream"
    t_mem, t_stream = WidthTables.load(mem / "nested" / WIDTHS_FILE), WidthTables.load(stream / "nested" / WIDTHS_FILE)
    assert torch.equal(t_mem.tables, t_stream.tables)
    assert bool((t_mem.tables < t_mem.full_table()).any())
    for key in ("keep_0.75", "keep_0.50"):
        _assert_same_weights(mem / "sliced" / key, stream / "sliced" / key)
    history = [json.loads((run / "stages" / "03-anneal" / "anneal_history.json").read_text()) for run in (mem, stream)]
    assert len(history[0]) == len(history[1]) == 6
    for a, b in zip(*history):  # the same losses step by step: the streamed backward is the same training
        assert b["quality"] == pytest.approx(a["quality"], rel=1e-4, abs=1e-7)
        assert b["deployed_keep"] == a["deployed_keep"]
    assert lm.peak_live == 1 and lm.live_layers() == []
    # each training step loads every layer twice (forward sweep, recomputing backward)
    assert lm.materialised_count >= lm.num_layers * (1 + 2 * 6 + 1 + 1 + 2)


def test_streamed_anneal_killed_resumes_to_the_same_tables(family_dirs, tmp_path, monkeypatch):
    from flexc.passes.anneal import Anneal

    def kill(self, step):
        if step == 3:
            raise KeyboardInterrupt("killed at step 3")

    spec = _spec(family_dirs["qwen3_moe"], tmp_path / "k", "layers", pipeline=ANNEAL)
    resumed = _killed_then_resumed(spec, Anneal, kill, monkeypatch)
    assert resumed.skipped == ["01-rank_channels", "02-insert_action_gates"]
    flexc.compile(_spec(family_dirs["qwen3_moe"], tmp_path / "clean", "layers", pipeline=ANNEAL), quiet=True)
    a = WidthTables.load(tmp_path / "k" / "nested" / WIDTHS_FILE)
    b = WidthTables.load(tmp_path / "clean" / "nested" / WIDTHS_FILE)
    assert torch.equal(a.tables, b.tables)
    history = (tmp_path / "k" / "stages" / "03-anneal" / "anneal_history.json").read_text()
    assert history == (tmp_path / "clean" / "stages" / "03-anneal" / "anneal_history.json").read_text()


RECOVER = [{"rank_channels": {"score": "activation", "plot": False}}, {"coverage": {"granule": 8}}, "fold_masks",
           {"recover": {"keep": 0.5, "steps": 3, "lr": 1e-2, "rank": 4, "checkpoint_every": 1}}]


@pytest.mark.parametrize("family, targets", [(f, ["experts"]) for f in FAMILIES] + [("qwen3_moe", ["attention", "experts"])])
def test_streamed_recover_equals_in_memory(family, targets, family_dirs, tmp_path, monkeypatch):
    """LoRA adapters trained one decoder layer at a time (teacher and student in one forward sweep,
    a recomputing backward sweep), merged by the exports as they write each layer: the same losses
    and the same exported weights as the in-memory fine-tune."""
    import copy
    import json

    pipeline = copy.deepcopy(RECOVER)
    pipeline[-1]["recover"]["targets"] = targets
    models = _spy_layer_models(monkeypatch)
    flexc.compile(_spec(family_dirs[family], tmp_path / "mem", "off", pipeline=pipeline), quiet=True)
    flexc.compile(_spec(family_dirs[family], tmp_path / "stream", "layers", pipeline=pipeline), quiet=True)
    (lm,) = models

    mem, stream = tmp_path / "mem", tmp_path / "stream"
    history = [json.loads((run / "stages" / "04-recover" / "recover_history.json").read_text()) for run in (mem, stream)]
    assert len(history[0]) == len(history[1]) == 3
    for a, b in zip(*history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-8)
    reports = [json.loads((run / "stages" / "04-recover" / "recover.json").read_text()) for run in (mem, stream)]
    for a, b in zip(reports[0]["merge"], reports[1]["merge"]):
        assert a["layer"] == b["layer"] and b["merged_norm"] == pytest.approx(a["merged_norm"], rel=1e-4)
        assert a["merged_norm"] > 0  # LoRA's B starts at zero: a non-zero update was trained
    _assert_same_weights(mem / "nested", stream / "nested", atol=1e-5)
    for key in ("keep_0.75", "keep_0.50"):
        _assert_same_weights(mem / "sliced" / key, stream / "sliced" / key, atol=1e-5)
    assert lm.peak_live == 1 and lm.live_layers() == []


def test_streamed_recover_killed_resumes_to_the_same_weights(family_dirs, tmp_path, monkeypatch):
    from flexc.passes.recover import Recover

    def kill(step, model):
        if step == 1:
            raise KeyboardInterrupt("killed at step 1")

    spec = _spec(family_dirs["qwen3_moe"], tmp_path / "k", "layers", pipeline=RECOVER)
    resumed = _killed_then_resumed(spec, Recover, staticmethod(kill), monkeypatch)
    assert resumed.skipped == ["01-rank_channels", "02-coverage", "03-fold_masks"]
    flexc.compile(_spec(family_dirs["qwen3_moe"], tmp_path / "clean", "layers", pipeline=RECOVER), quiet=True)
    history = (tmp_path / "k" / "stages" / "04-recover" / "recover_history.json").read_text()
    assert history == (tmp_path / "clean" / "stages" / "04-recover" / "recover_history.json").read_text()
    _assert_same_weights(tmp_path / "k" / "nested", tmp_path / "clean" / "nested", atol=0.0)


# Experts 64 wide: two 32-channel quantization groups, so the budgets cut between groups.
WIDE = {"qwen3_moe": {"moe_intermediate_size": 64}, "qwen2_moe": {"moe_intermediate_size": 64},
        "mixtral": {"intermediate_size": 64}}


@pytest.mark.parametrize("family, method, recover", [("qwen3_moe", "gptq", False), ("qwen2_moe", "rtn", False),
                                                     ("mixtral", "gptq", True)])
def test_streamed_quantize_equals_in_memory(family, method, recover, tmp_path, monkeypatch):
    """quantize one decoder layer at a time (GPTQ's Hessians from a layer-by-layer sweep; after a streamed
    recover, on its merged weights), its codes written by the exports: the same report, scales, nested
    weights and packed sliced checkpoints as in memory, and a sliced checkpoint that loads."""
    import json

    from flexc.export.sliced import load_sliced

    model = compiler_helpers.make_tiny_moe(tmp_path / "model", family=family, **WIDE[family])
    pipeline = [{"rank_channels": {"score": "activation", "plot": False}}, {"coverage": {"granule": 32}}, "fold_masks"]
    pipeline += [{"recover": {"keep": 0.5, "steps": 2, "lr": 1e-2, "rank": 4}}] if recover else []
    pipeline += [{"quantize": {"scheme": "w4a16", "group_size": 32, "method": method}}]
    budgets = {"keep": [0.75, 0.5], "grid": 32}
    models = _spy_layer_models(monkeypatch)
    flexc.compile(_spec(model, tmp_path / "mem", "off", pipeline=pipeline, budgets=budgets), quiet=True)
    flexc.compile(_spec(model, tmp_path / "stream", "layers", pipeline=pipeline, budgets=budgets), quiet=True)
    (lm,) = models

    mem, stream = tmp_path / "mem", tmp_path / "stream"
    stage = f"0{len(pipeline)}-quantize"
    reports = [json.loads((run / "stages" / stage / "quantize.json").read_text()) for run in (mem, stream)]
    assert [r["layer"] for r in reports[0]["layers"]] == [r["layer"] for r in reports[1]["layers"]]
    for a, b in zip(reports[0]["layers"], reports[1]["layers"]):
        for key in ("gate_up_weight_error", "down_weight_error", "gate_up_output_error", "down_output_error"):
            assert a[key] is None if method == "rtn" and "output" in key else b[key] == pytest.approx(a[key], rel=1e-5)
    widths = WidthTables.load(mem / "nested" / WIDTHS_FILE).tables
    assert bool(((widths > 0) & (widths < 64)).any())  # a budget cuts between the two groups
    _assert_same_weights(mem / "nested", stream / "nested", atol=1e-5)  # dequantized weights and the scales file
    manifests = [json.loads((run / "nested" / "flexc_manifest.json").read_text()) for run in (mem, stream)]
    assert manifests[1]["quantization"] == manifests[0]["quantization"]
    for key in ("keep_0.75", "keep_0.50"):
        _assert_same_weights(mem / "sliced" / key, stream / "sliced" / key, atol=1e-5)  # packed codes too
        sliced = [json.loads((run / "sliced" / key / "flexc_manifest.json").read_text()) for run in (mem, stream)]
        assert sliced[1]["params"] == sliced[0]["params"] and sliced[1]["quantization"] == sliced[0]["quantization"]
        assert sliced[1]["bytes"]["routed_experts"] == sliced[0]["bytes"]["routed_experts"]
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    with torch.no_grad():
        a = load_sliced(mem / "sliced" / "keep_0.50")(ids).logits
        b = load_sliced(stream / "sliced" / "keep_0.50")(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert lm.peak_live == 1 and lm.live_layers() == []


def test_a_streamed_export_names_missing_quantized_codes(tmp_path):
    """The exports of a streamed quantize read its codes from the stage folder: a missing file is named."""
    from flexc.compiler.artifacts import STATE_DIR
    from flexc.ir.state import CompileState
    from flexc.ir.streaming import LayerGraph, LayerModel
    from flexc.passes.quantize_streamed import CODES_KEY, layer_merger

    model = compiler_helpers.make_tiny_moe(tmp_path / "model", family="qwen3_moe", **WIDE["qwen3_moe"])
    spec = _spec(model, tmp_path / "run", "layers", budgets={"keep": [0.5], "grid": 32},
                 pipeline=[{"rank_channels": {"score": "activation", "plot": False}}, {"coverage": {"granule": 32}},
                           "fold_masks", {"quantize": {"scheme": "w8a16", "group_size": 32, "method": "rtn"}}])
    flexc.compile(spec, quiet=True)
    state = CompileState.load(tmp_path / "run" / STATE_DIR)
    folder = Path(state.extras[CODES_KEY])
    assert sorted(f.name for f in folder.iterdir()) == ["layer0.safetensors", "layer1.safetensors"]
    (folder / "layer1.safetensors").unlink()
    lm = LayerModel(model)
    merge = layer_merger(lm, state)
    with pytest.raises(FileNotFoundError, match=r"codes of MoE layer 1 are missing .*layer1.safetensors"):
        merge(1, LayerGraph(lm.materialise(1), lm, lm.group_at(1), index=1))


def test_stream_refuses_a_weight_reading_pass_after_recover(moe_dir):
    spec = _spec(moe_dir, Path("unused"), "layers")
    spec["pipeline"] = [{"rank_channels": {"score": "activation"}}, "coverage", "fold_masks", {"recover": {"keep": 0.5}},
                        {"rank_channels": {"score": "activation"}}]
    with pytest.raises(SpecError) as err:
        flexc.compile(spec)
    assert "pass 'rank_channels' cannot run after recover with execution.stream: layers" in str(err.value)


def test_stream_refuses_other_exports(moe_dir):
    spec = _spec(moe_dir, Path("unused"), "layers")
    spec["export"]["formats"] = ["nested", "onnx"]
    with pytest.raises(SpecError, match="export 'onnx' cannot be written with execution.stream: layers"):
        flexc.compile(spec)


def test_stream_field_is_checked():
    with pytest.raises(SpecError, match="expected one of 'off', 'layers'"):
        Spec.from_yaml_text("model: {zoo: tiny}\nexecution: {stream: layer}\n")
    with pytest.raises(SpecError, match="unknown key 'streem'"):
        Spec.from_yaml_text("model: {zoo: tiny}\nexecution: {streem: layers}\n")


def test_default_execution_keeps_old_fingerprints():
    spec = Spec.model_validate({"model": {"zoo": "tiny"}})
    assert "execution" not in spec.to_dict()
    streamed = Spec.model_validate({"model": {"zoo": "tiny"}, "execution": {"stream": "layers"},
                                    "pipeline": [{"rank_channels": {"score": "activation"}}]})
    assert streamed.to_dict()["execution"] == {"stream": "layers"}
    assert streamed.fingerprint() != Spec.model_validate(
        {"model": {"zoo": "tiny"}, "pipeline": [{"rank_channels": {"score": "activation"}}]}).fingerprint()


def test_stream_auto_compiles_in_memory_when_the_model_fits_and_streams_when_not(family_dirs, tmp_path, monkeypatch):
    import json

    from flexc.compiler import memory

    model_dir = family_dirs["qwen3_moe"]
    roomy = flexc.compile(_spec(model_dir, tmp_path / "roomy", "auto"), quiet=True)
    chosen = json.loads((tmp_path / "roomy" / "manifest.json").read_text())["execution"]
    assert chosen["chosen"] == "off" and chosen["needed_bytes"] <= chosen["available_bytes"]
    params = sum(t.numel() for t in _tensors(model_dir).values())
    assert chosen["model_bytes"] == params * 4  # float32, counted on the meta model
    assert "02-coverage" in roomy.ran

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)  # 1 MB: nothing fits
    flexc.compile(_spec(model_dir, tmp_path / "tight", "auto"), quiet=True)
    chosen = json.loads((tmp_path / "tight" / "manifest.json").read_text())["execution"]
    assert chosen["chosen"] == "layers" and chosen["available_bytes"] == 1 << 20
    assert not (tmp_path / "tight" / "state" / "graph").exists()  # the streamed compile's state: no graph
    for key in ("keep_0.75", "keep_0.50"):
        _assert_same_weights(tmp_path / "roomy" / "sliced" / key, tmp_path / "tight" / "sliced" / key)


def test_stream_auto_says_why_a_model_that_does_not_fit_cannot_stream(moe_dir, tmp_path, monkeypatch):
    from flexc.compiler import memory
    from flexc.compiler.errors import FlexcError

    spec = _spec(moe_dir, tmp_path / "out", "auto")
    spec["pipeline"] = [{"rank_channels": {"score": "activation"}}, "coverage", "fold_masks", "lower_kernels"]
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)
    with pytest.raises(FlexcError) as err:
        flexc.compile(spec, quiet=True)
    text = str(err.value)
    assert "execution.stream: auto" in text and "GB is available" in text
    assert "pass 'lower_kernels' cannot run with execution.stream: layers" in text


def test_release_memory_collects_garbage_only_when_memory_did_not_come_back(monkeypatch):
    """A collection costs 0.1-0.2 s and freed layers come back without one; it runs when resident memory
    grew by more than half a large free since the previous release (something still holds the tensors)."""
    import gc

    from flexc.ir import streaming

    layer = 256 << 20
    resident = [1 << 30]
    collections = []
    monkeypatch.setattr(streaming, "_resident_bytes", lambda: resident[0])
    monkeypatch.setattr(streaming, "_after_last_release", [])
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(resident[0]) or 0)

    streaming.release_memory(layer)  # no earlier reading: collects once
    streaming.release_memory(layer)  # memory came back: nothing to collect
    resident[0] += layer // 4
    streaming.release_memory(layer)  # grew by a quarter of a layer (e.g. boundary states): still none
    assert len(collections) == 1
    resident[0] += layer  # a whole layer still resident
    streaming.release_memory(layer)
    assert len(collections) == 2
    resident[0] += 2 * layer
    streaming.release_memory(1 << 20)  # a small free never collects
    assert len(collections) == 2
    monkeypatch.setattr(streaming, "_resident_bytes", lambda: None)  # not Linux: collect after large frees
    streaming.release_memory(layer)
    streaming.release_memory(layer)
    assert len(collections) == 4


STREAMING_PASSES = '''
from flexc.passes import Pass, PassResult


class CountGroups(Pass):
    """A user's pass with a streamed form of its own."""

    name = "count_groups"
    streams = True

    def run(self, graph, ctx):
        ctx.state.extras["seen"] = {"how": "run", "groups": len(graph.groups)}
        return PassResult(graph=graph, modified=False)

    def run_streamed(self, model, ctx):
        ctx.state.extras["seen"] = {"how": "run_streamed", "groups": len(model.groups)}


class WholeGraphOnly(Pass):
    name = "whole_graph_only"
    not_streamed_because = "it reads the whole graph at once"

    def run(self, graph, ctx):
        return PassResult(graph=graph, modified=False)
'''


def test_a_users_pass_declares_how_it_streams(moe_dir, tmp_path, monkeypatch):
    from flexc.ir.state import CompileState

    (tmp_path / "streampasses.py").write_text(STREAMING_PASSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = {}
    for stream in ("layers", "off"):
        spec = _spec(moe_dir, tmp_path / stream, stream)
        spec["pipeline"].append({"name": "streampasses:CountGroups"})
        flexc.compile(spec, quiet=True)
        seen[stream] = CompileState.load(tmp_path / stream / "state").extras["seen"]
    assert seen["layers"] == {"how": "run_streamed", "groups": 2}
    assert seen["off"] == {"how": "run", "groups": 2}
    spec = _spec(moe_dir, tmp_path / "refused", "layers")
    spec["pipeline"].append({"name": "streampasses:WholeGraphOnly"})
    with pytest.raises(SpecError, match="pass 'streampasses:WholeGraphOnly' cannot run with execution.stream: layers: "
                                        "it reads the whole graph at once"):
        flexc.compile(spec)
