"""quantize: per-group int8/int4 expert weights that keep every budget a prefix (DESIGN.md, "Compose with
quantization"): slicing the quantized nested weights equals quantizing the sliced weights, GPTQ-style
compensation stays inside the widths a budget cuts at, and every budget's output error is bounded on
every family."""

import logging
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from flexc.ir import lower
from flexc.ir.experts_impl import module_weights
from flexc.ir.op import run_experts
from flexc.ir.testing import tiny_families, tiny_model
from flexc.passes import PassContext, resolve_pass
from flexc.passes.manager import run_pass
from flexc.ir.quant.nested import quantize_gptq, quantize_rtn
from flexc.ir.quant.scheme import QuantScheme

I = 64  # two quantization groups of 32 per expert
BUDGETS = (0.75, 0.5)
W_KEY = {"qwen3_moe": "moe_intermediate_size", "qwen2_moe": "moe_intermediate_size",
         "deepseek_v3": "moe_intermediate_size"}


def correlated_inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    """Inputs with correlated columns of falling scale, like ranked channels' activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=g) / cols ** 0.5
    return torch.randn(n, cols, generator=g) @ mix * torch.linspace(2.0, 0.2, cols)


def output_error(w, q, x, width):
    return float(((x[:, :width] @ (q.dequantized()[..., :width] - w[..., :width]).transpose(-1, -2)) ** 2).mean())


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_rtn_slice_of_quantized_equals_quantized_slice(scheme):
    s = QuantScheme(scheme, 32)
    w = torch.randn(4, 24, 128, generator=torch.Generator().manual_seed(0))
    whole = quantize_rtn(w, s)
    for width in (32, 64, 96):
        part = quantize_rtn(w[..., :width], s)  # down: a budget keeps a prefix of input channels
        assert torch.equal(part.codes, whole.codes[..., :width])
        assert torch.equal(part.scales, whole.scales[..., :width // 32])
    rows = quantize_rtn(w[:, :10], s)  # gate_up: a budget keeps a prefix of output rows
    assert torch.equal(rows.codes, whole.codes[:, :10])
    assert whole.codes.min() >= -2 ** (s.bits - 1) and whole.codes.max() <= 2 ** (s.bits - 1) - 1


def test_gptq_prefix_does_not_depend_on_the_channels_a_budget_drops():
    s = QuantScheme("w4a16", 32)
    w = torch.randn(3, 16, 128, generator=torch.Generator().manual_seed(1))
    x = correlated_inputs(4000, 128, seed=2)
    h = torch.stack([x.t() @ x] * 3)
    cuts = [[32, 64], [64], [32, 64, 96]]
    whole = quantize_gptq(w, h, s, cuts=cuts)
    # Other statistics and weights for the dropped channels [64, 128) change nothing in the prefix.
    other = h.clone()
    other[:, 64:, :] *= 3.0
    other[:, :, 64:] *= 3.0
    w2 = w.clone()
    w2[..., 64:] = torch.randn(3, 16, 64)
    changed = quantize_gptq(w2, other, s, cuts=cuts)
    assert torch.equal(changed.codes[..., :64], whole.codes[..., :64])
    # and the prefix is the quantization of the sliced weights on the sliced Hessian
    part = quantize_gptq(w[..., :64].contiguous(), h[:, :64, :64].contiguous(), s, cuts=[[32], [], [32]])
    assert (part.codes == whole.codes[..., :64]).float().mean() > 0.995
    torch.testing.assert_close(part.scales, whole.scales[..., :2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_gptq_beats_round_to_nearest_at_every_cut(scheme):
    s = QuantScheme(scheme, 32)
    w = torch.randn(2, 32, 128, generator=torch.Generator().manual_seed(3))
    x = correlated_inputs(4000, 128, seed=4)
    h = torch.stack([x.t() @ x] * 2)
    rtn, gptq = quantize_rtn(w, s), quantize_gptq(w, h, s, cuts=[[32, 64, 96]] * 2)
    for width in (32, 64, 96, 128):
        assert output_error(w, gptq, x, width) < 0.97 * output_error(w, rtn, x, width), width


def test_gptq_of_a_few_experts_at_a_time_is_gptq_of_all_at_once():
    """Experts are quantized independently: working on two at a time (bounded memory) gives each the codes it
    gets among all five, its own cuts and Hessian included."""
    s = QuantScheme("w4a16", 32)
    w = torch.randn(5, 16, 96, generator=torch.Generator().manual_seed(6))
    h = torch.stack([(x.t() @ x) for x in (correlated_inputs(1000, 96, seed=10 + e) for e in range(5))])
    cuts = [[32], [64], [], [32, 64], [64]]
    together = quantize_gptq(w, h, s, cuts=cuts)
    chunked = quantize_gptq(w, h, s, cuts=cuts, hessian_bytes=2 * 8 * 96 ** 2)  # two experts' Hessians at a time
    assert (chunked.codes == together.codes).float().mean() > 0.999
    torch.testing.assert_close(chunked.scales, together.scales, rtol=1e-5, atol=1e-7)
    alone = quantize_gptq(w[3:4], h[3:4], s, cuts=cuts[3:4])  # one expert on its own: its cuts go with it
    assert (alone.codes == together.codes[3:4]).float().mean() > 0.999


def test_gptq_without_tokens_is_round_to_nearest():
    s = QuantScheme("w4a16", 32)
    w = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(5))
    assert torch.equal(quantize_gptq(w, torch.zeros(2, 64, 64), s).codes, quantize_rtn(w, s).codes)


def test_gptq_refuses_a_cut_inside_a_group():
    with pytest.raises(ValueError, match="multiple of the group size 32"):
        quantize_gptq(torch.randn(1, 4, 64), torch.eye(64)[None], QuantScheme("w4a16", 32), cuts=[[48]])


# ---- the pass, on every family ---------------------------------------------------------------


def _data(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (4, 16), generator=g) for _ in range(n)]


def _ctx(tmp_path, state=None, grid=32):
    spec = SimpleNamespace(budgets=SimpleNamespace(keep_ratios=BUDGETS, metric="params", grid=grid, max_buckets=None))
    return PassContext(workdir=tmp_path, spec=spec, calibration_data=_data(), quiet=True,
                       state=state if state is not None else {}, logger=logging.getLogger("test"))


def _tabled(family, tmp_path):
    graph = lower(tiny_model(family, **{W_KEY.get(family, "intermediate_size"): I}))
    ctx = _ctx(tmp_path)
    run_pass(resolve_pass("rank_channels")({"plot": False}), graph, ctx)
    run_pass(resolve_pass("uniform")({"granule": 32}), graph, ctx)
    return graph, ctx.state


def _layer_outputs(graph, state, weights_of, budget):
    """Each MoE layer's routed-expert output at ``budget``'s widths, on fixed inputs and routing (every
    expert hit), so the figure measures the weights, not a routing change upstream. (Random inputs, not
    the calibration's: the bounds are round-to-nearest's scale, ~0.5% per int8 and ~10% per int4 matmul.)"""
    g0 = torch.Generator().manual_seed(11)
    out = []
    for i, g in enumerate(graph.groups):
        hidden = torch.randn(64, g.hidden_size, generator=g0)
        ids = torch.stack([torch.arange(64) % g.num_experts, (torch.arange(64) + 3) % g.num_experts], dim=1)
        widths = state.width_tables.table(budget)[i] if budget < 1 else None
        with torch.no_grad():
            out.append(run_experts(hidden, ids, torch.full((64, 2), 0.5), weights_of(i, g), widths))
    return out


@pytest.mark.parametrize("family", tiny_families())
@pytest.mark.parametrize("scheme,method,bound", [("w8a16", "rtn", 0.02), ("w4a16", "gptq", 0.35)])
def test_each_budget_output_error_is_bounded(family, scheme, method, bound, tmp_path):
    graph, state = _tabled(family, tmp_path / "tables")
    originals = [tuple(t.detach().clone() for t in graph.expert_weights(g)) for g in graph.groups]

    def weights_of(i, g, original=False):
        current = module_weights(graph.experts_module(g))
        return replace(current, gate_up=originals[i][0], down=originals[i][1]) if original else current

    before = {b: _layer_outputs(graph, state, lambda i, g: weights_of(i, g, True), b) for b in (1.0, *BUDGETS)}
    ctx = _ctx(tmp_path / "q", state)
    run_pass(resolve_pass("quantize")({"scheme": scheme, "group_size": 32, "method": method}), graph, ctx)
    assert ctx.state.quantization["scheme"] == scheme and ctx.state.quantization["bits"] == int(scheme[1])
    for b, refs in before.items():
        for ref, now in zip(refs, _layer_outputs(graph, ctx.state, weights_of, b)):
            err = float((now - ref).norm() / ref.norm())
            assert 0 < err < bound, (b, err)
    if method == "rtn":  # each budget's weights are the quantization of that budget's sliced weights
        s = QuantScheme(scheme, 32)
        for b in BUDGETS:
            table = ctx.state.width_tables.table(b)
            for i, g in enumerate(graph.groups):
                down = graph.expert_weights(g)[1]
                for e in range(g.num_experts):
                    w = int(table[i, e])
                    part = quantize_rtn(originals[i][1][e:e + 1, :, :w], s).dequantized(down.dtype)
                    torch.testing.assert_close(down[e:e + 1, :, :w], part, rtol=0, atol=0)


def test_widths_that_are_not_whole_groups_are_refused(tmp_path):
    graph = lower(tiny_model("qwen3_moe", moe_intermediate_size=I))
    ctx = _ctx(tmp_path, grid=None)
    run_pass(resolve_pass("rank_channels")({"plot": False}), graph, ctx)
    run_pass(resolve_pass("uniform")({"granule": 16}), graph, ctx)  # widths of 48 at keep 0.75
    with pytest.raises(ValueError, match="not whole quantization groups of 32; set budgets.grid"):
        run_pass(resolve_pass("quantize")({"scheme": "w4a16", "group_size": 32, "method": "rtn"}), graph, ctx)


# ---- the quantized sliced export -------------------------------------------------------------


def test_packed_codes_unpack_as_compressed_tensors_does():
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from flexc.export.remote.modeling_flexc_sliced import unpack_codes
    from flexc.ir.quant.nested import pack_codes

    for scheme, cols in (("w4a16", 96), ("w8a16", 64)):
        s = QuantScheme(scheme, 32)
        low, high = -2 ** (s.bits - 1), 2 ** (s.bits - 1) - 1
        codes = torch.randint(low, high + 1, (3, 5, cols), generator=torch.Generator().manual_seed(s.bits),
                              dtype=torch.int8)
        packed = pack_codes(codes, s)
        assert packed.dtype == torch.int32 and packed.shape[-1] == cols * s.bits // 32
        assert torch.equal(unpack_codes(packed, s.bits, cols), codes)
        assert torch.equal(unpack_from_int32(packed, s.bits, codes.shape), codes)


@pytest.fixture(scope="module")
def quantized_exports(tmp_path_factory):
    """Per family: a rank → uniform (granule 32) → quantize (w4a16, group 32, gptq) compile's sliced export,
    with the nested runtime's logits at each budget saved beside it."""
    from flexc.compiler.exporters import ExportContext, get_exporter
    from flexc.eval.budgets import apply_budget
    from flexc.export.tables import budget_key

    root = tmp_path_factory.mktemp("qsliced")
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    torch.save(ids, root / "ids.pt")
    out = {}
    for family in tiny_families():
        graph, state = _tabled(family, root / f"{family}-tables")
        ctx = _ctx(root / f"{family}-quantize", state)
        run_pass(resolve_pass("quantize")({"scheme": "w4a16", "group_size": 32}), graph, ctx)
        target = root / family
        target.mkdir()
        get_exporter("sliced")(ExportContext(target=target, spec=None, model=graph.model, graph=graph, state=ctx.state))
        for b in BUDGETS:
            apply_budget(graph, ctx.state, b)
            with torch.no_grad():
                torch.save(graph.logits(ids), target / f"expected_{budget_key(b)}.pt")
        apply_budget(graph, ctx.state, None)
        out[family] = dict(dir=target, graph=graph)
    return root, ids, out


@pytest.mark.parametrize("family", tiny_families())
def test_quantized_sliced_export_equals_the_nested_runtime_and_is_packed(quantized_exports, family):
    import json

    from flexc.export.sliced import load_sliced
    from flexc.export.tables import budget_key

    root, ids, out = quantized_exports
    target, graph = out[family]["dir"], out[family]["graph"]
    has_bias = graph.groups[0].has_bias
    for b in BUDGETS:
        model = load_sliced(target, budget=b)
        experts = model.get_submodule(graph.groups[0].path)
        assert experts.bits == 4 and experts.group == 32
        assert all(p.dtype == torch.int32 for n, p in experts.named_parameters() if n.endswith("_packed"))
        assert not any(n.endswith(("_gate_up", "_down")) for n, _ in experts.named_parameters())
        with torch.no_grad():
            logits = model(ids).logits
        torch.testing.assert_close(logits, torch.load(target / f"expected_{budget_key(b)}.pt"), rtol=1e-5, atol=1e-5)
        manifest = json.loads((target / budget_key(b) / "flexc_manifest.json").read_text())
        assert manifest["quantization"]["scheme"] == "w4a16" and "scales" not in manifest["quantization"]
        # int4 codes plus one fp32 scale per 32 of them (biases in fp32), against 2 bytes per unpruned bf16 weight
        modules = [m for m in model.modules() if type(m).__name__ == "SlicedExperts"]
        weights = sum(len(ids) * 3 * w * m.hidden_size for m in modules for w, ids in m.buckets)
        biases = manifest["params"]["routed"] - weights
        assert (biases > 0) == has_bias
        expected = (weights * (0.5 + 4 / 32) + biases * 4) / (2 * manifest["params"]["full_routed"])
        ratio = manifest["bytes"]["routed_experts_vs_unpruned_bf16"]
        assert ratio == pytest.approx(expected, rel=1e-9), (b, ratio, expected)


def test_quantized_sliced_loads_with_trust_remote_code_without_flexc(quantized_exports, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from flexc.export.tables import budget_key
    from test_export_sliced import _REMOTE_CHECK

    root, _, _ = quantized_exports
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _REMOTE_CHECK, str(root), budget_key(BUDGETS[1])], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(worst) == len(tiny_families()) and max(worst.values()) <= 1e-5, worst


def test_vllm_plugin_refuses_a_malformed_quantization_section(tmp_path):
    from flexc.serving.artifact import detect
    from flexc.serving.families import ServingError

    config = SimpleNamespace(flexc_sliced={"format": 2, "experts": {}, "quantization": {"bits": 3, "group_size": 32}})
    with pytest.raises(ServingError, match="quantization is .*expected bits 4 or 8"):
        detect(tmp_path, config)
    config.flexc_sliced["quantization"] = {"bits": 4, "group_size": 32}
    assert detect(tmp_path, config).kind == "sliced"


def test_the_scheme_and_scales_survive_a_saved_state(tmp_path):
    from flexc.ir.state import CompileState

    scales = {"layer0": {"gate_up": torch.rand(2, 8, 1), "down": torch.rand(2, 4, 2)}}
    state = CompileState(quantization={"scheme": "w4a16", "bits": 4, "group_size": 32, "method": "gptq",
                                       "scales": scales})
    state.save(tmp_path)
    back = CompileState.load(tmp_path).quantization
    assert {k: v for k, v in back.items() if k != "scales"} == {"scheme": "w4a16", "bits": 4, "group_size": 32,
                                                               "method": "gptq"}
    assert torch.equal(back["scales"]["layer0"]["down"], scales["layer0"]["down"])
    assert CompileState.load(_saved_empty(tmp_path / "empty")).quantization is None


def _saved_empty(directory):
    from flexc.ir.state import CompileState

    CompileState().save(directory)
    return directory


def _compile_spec(model_dir, out) -> dict:
    data = {"builtin": "python-stdlib", "num_samples": 8, "seq_len": 64, "batch_size": 4}
    return {"model": {"path": str(model_dir)}, "data": {"calibration": {**data, "split": "train"}},
            "budgets": {"keep": [0.75, 0.5], "grid": 32},
            "pipeline": [{"rank_channels": {"score": "activation", "plot": False}}, {"uniform": {"granule": 32}},
                         {"quantize": {"scheme": "w4a16", "group_size": 32}}],
            "export": {"dir": str(out), "formats": ["nested", "sliced"]}}


@pytest.fixture(scope="module")
def quantized_compile(tiny_model_dir, tmp_path_factory):
    """A compile of the zoo ``tiny`` model: rank, uniform widths on a grid of 32, quantize (w4a16, gptq)."""
    import flexc

    out = tmp_path_factory.mktemp("quantized") / "run"
    flexc.compile(_compile_spec(tiny_model_dir, out), quiet=True)
    return out


def test_a_compile_resumed_after_quantize_exports_what_an_uninterrupted_one_does(tiny_model_dir, quantized_compile,
                                                                                 tmp_path, monkeypatch):
    """The quantized weights and the scales are saved with the stage: a compile whose export failed resumes
    after ``quantize`` and writes the same sliced checkpoint as a compile that never stopped."""
    import flexc
    import flexc.export.registry as registry
    from flexc.export.sliced import load_sliced

    def spec(out):
        return _compile_spec(tiny_model_dir, out)

    real = registry.get_exporter

    def failing(fmt):
        def export(ctx):
            raise RuntimeError("export failed on purpose")
        return export if fmt == "sliced" else real(fmt)

    monkeypatch.setattr(registry, "get_exporter", failing)
    with pytest.raises(RuntimeError, match="on purpose"):
        flexc.compile(spec(tmp_path / "resumed"), quiet=True)
    monkeypatch.setattr(registry, "get_exporter", real)
    result = flexc.compile(spec(tmp_path / "resumed"), quiet=True)
    assert "03-quantize" in result.skipped
    for b in (0.75, 0.5):
        straight = load_sliced(quantized_compile / "sliced", budget=b)
        resumed = load_sliced(tmp_path / "resumed" / "sliced", budget=b)
        for (name, x), (_, y) in zip(straight.state_dict().items(), resumed.state_dict().items()):
            assert torch.equal(x, y), (b, name)


# ---- the runtime on integer codes ------------------------------------------------------------


@pytest.mark.parametrize("family", tiny_families())
def test_codes_dequantized_per_expert_prefix_compute_the_dequantized_weights(family, tmp_path):
    """Experts held as int8 codes and scales (each expert hit dequantizes its kept prefix) compute what the
    dequantized float weights compute, with per-expert and per-pair widths, on every family's layout."""
    from flexc.ir.layout import QuantScales
    from flexc.ir.quant.nested import codes_of

    graph, state = _tabled(family, tmp_path / "tables")
    ctx = _ctx(tmp_path / "q", state)
    run_pass(resolve_pass("quantize")({"scheme": "w4a16", "group_size": 32, "method": "rtn"}), graph, ctx)
    s = QuantScheme("w4a16", 32)
    g = graph.groups[0]
    dense = module_weights(graph.experts_module(g))
    scales = ctx.state.quantization["scales"][f"layer{g.layer}"]
    codes = replace(dense, gate_up=codes_of(dense.gate_up, scales["gate_up"], s),
                    down=codes_of(dense.down, scales["down"], s),
                    scales=QuantScales(scales["gate_up"], scales["down"], 32))
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(12, g.hidden_size, generator=gen)
    ids = torch.stack([torch.arange(12) % g.num_experts, (torch.arange(12) + 5) % g.num_experts], dim=1)
    weights = torch.rand(12, 2, generator=gen)
    per_expert = ctx.state.width_tables.table(0.5)[0]
    per_pair = torch.tensor([0, 32, I])[torch.randint(0, 3, (12, 2), generator=gen)]
    with torch.no_grad():
        for widths in (None, per_expert, per_pair):
            torch.testing.assert_close(run_experts(hidden, ids, weights, codes, widths),
                                       run_experts(hidden, ids, weights, dense, widths), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reference path only"):
        codes.op_args(None)


def test_flexc_load_holds_a_quantized_nested_artifact_as_codes_and_switches_live(quantized_compile):
    import flexc

    nested = quantized_compile / "nested"
    codes = flexc.load(nested, budget=0.5)
    dense = flexc.load(nested, budget=0.5, quantized=False)
    experts = codes.get_submodule(codes.flexc.groups[0].path)
    assert experts.gate_up_proj.numel() == 0 and experts.flexc_codes_down.dtype == torch.int8
    ids = torch.randint(0, codes.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for b in (0.75, 0.5, 1.0):
        codes.set_budget(b)
        dense.set_budget(b)
        with torch.no_grad():
            torch.testing.assert_close(codes(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="applies to nested artifacts"):
        flexc.load(quantized_compile / "sliced", budget=0.5, quantized=False)


def test_a_quantized_nested_artifact_without_its_scales_is_refused(quantized_compile, tmp_path):
    import shutil

    import flexc
    from flexc.export.nested import QUANT_FILE, ArtifactError

    copy = tmp_path / "nested"
    shutil.copytree(quantized_compile / "nested", copy)
    (copy / QUANT_FILE).unlink()
    with pytest.raises(ArtifactError, match="cannot read the quantization scales"):
        flexc.load(copy)
    assert flexc.load(copy, quantized=False) is not None  # the stored dequantized weights still load
