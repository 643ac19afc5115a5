"""Triton expert kernels == the reference op.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (tiny shapes, fp32/fp16).
Triton fixes interpreted vs. compiled when it is imported, so this module sets
``TRITON_INTERPRET=1`` before importing anything that imports triton; when an earlier test
module of the same session already imported triton, the kernel tests run instead in one
pytest subprocess (``test_interpreter_subprocess``). With CUDA the same tests run compiled on
the GPU, and the ``cuda``-marked tests (CUDA-graph capture with width swaps, no recompilation,
bf16 on a real expert shape) run too; without CUDA they skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import: it fixes the mode of triton's own library

from flexc.ir.op import ExpertLayout, ExpertWeights, moe_experts_reference, register_backend, run_experts  # noqa: E402


def _kernels_runnable_here() -> bool:
    if HAS_CUDA:
        return True
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl_standard.sum, InterpretedFunction)


IN_PROCESS = _kernels_runnable_here()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

def _apply(marks):
    def deco(fn):
        for m in reversed(marks):
            fn = m(fn)
        return fn
    return deco


TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _kernels():
    if not IN_PROCESS:
        pytest.skip("triton was imported before this module in compiled mode: run by test_interpreter_subprocess")
    from flexc.kernels.dispatch import kernels_module

    return kernels_module()


def test_interpreter_subprocess():
    """The kernel tests of this file, in a fresh interpreter-mode process (when not runnable here)."""
    if IN_PROCESS:
        pytest.skip("kernel tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def _interp_config(**kw):
    from flexc.kernels.triton_experts import default_config

    return default_config(8, 2, 8, interpret=not HAS_CUDA).replace(**kw)


def make_case(T, E, H, I, k, dtype, *, seed, bias=False, transposed=False, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g)
    tw, ids = logits.softmax(-1).topk(k, dim=-1)
    if transposed:  # GPT-OSS stores [E, H, 2I] / [E, I, H]; the op sees transposed views
        gate_up = (torch.randn(E, H, 2 * I, generator=g) * H**-0.5).transpose(1, 2)
        down = (torch.randn(E, I, H, generator=g) * I**-0.5).transpose(1, 2)
    else:
        gate_up = torch.randn(E, 2 * I, H, generator=g) * H**-0.5
        down = torch.randn(E, H, I, generator=g) * I**-0.5
    gub = torch.randn(E, 2 * I, generator=g) * 0.5 if bias else None
    db = torch.randn(E, H, generator=g) * 0.5 if bias else None

    def to(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    return dict(hidden=to(x), topk_ids=ids.to(device), topk_weights=to(tw), gate_up=to(gate_up), down=to(down),
                gate_up_bias=to(gub), down_bias=to(db))


def case_weights(case) -> ExpertWeights:
    """A case's expert weights as the op's one value (the kernels' backend signature takes it)."""
    return ExpertWeights(case["gate_up"], case["down"], case["gate_up_bias"], case["down_bias"])


def reference(case, widths, activation="silu", interleaved=False, alpha=1.702, limit=7.0):
    """The reference op in float64 on the CPU."""
    def f(t):
        return None if t is None else t.detach().to("cpu", torch.float64)

    w = None if widths is None else widths.cpu()
    weights = ExpertWeights(f(case["gate_up"]), f(case["down"]), f(case["gate_up_bias"]), f(case["down_bias"]),
                            ExpertLayout(activation, interleaved, alpha, limit))
    return moe_experts_reference(f(case["hidden"]), case["topk_ids"].cpu(), f(case["topk_weights"]), weights, w)


def run_kernel(case, widths, config=None, activation="silu", interleaved=False, alpha=1.702, limit=7.0, granule=None):
    mod = _kernels()
    return mod.moe_forward(case["hidden"], case["topk_ids"], case["topk_weights"], case["gate_up"], case["down"],
                           case["gate_up_bias"], case["down_bias"], widths, activation, interleaved, alpha, limit,
                           config=config, granule=granule)


def rel_err(out, ref):
    assert out.shape == ref.shape
    out = out.detach().to("cpu", torch.float64)
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def width_mix(E, I, granule, seed):
    """Widths including 0, one granule, an odd value, full width, and random granule multiples."""
    g = torch.Generator().manual_seed(seed)
    fixed = [0, granule, I, 23 % I or 1]
    rest = (torch.randint(0, I // granule + 1, (max(0, E - len(fixed)),), generator=g) * granule).tolist()
    w = torch.tensor((fixed + rest)[:E], dtype=torch.int32)
    return w[torch.randperm(E, generator=g)].to(DEVICE)


# --------------------------------------------------------------------------------------------
# kernel == reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_grouped_path_matches_reference(batch, top_k, dtype):
    E, I = 8, 64
    H = 64 if dtype == torch.float32 else 48  # 48: the masked reduction tail
    case = make_case(batch, E, H, I, top_k, dtype, seed=batch * 10 + top_k)
    widths = width_mix(E, I, 16, seed=batch + top_k)
    cfg = _interp_config(path="grouped")
    out = run_kernel(case, widths, cfg)
    assert out.dtype == dtype
    assert rel_err(out, reference(case, widths)) < TOL[dtype]


@pytest.mark.parametrize("layout", ["concatenated", "interleaved_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_grouped_path_tensor_descriptors(layout, dtype):
    """Weights read through tensor descriptors (``tma1``/``tma2``): same answers, odd widths included."""
    E, H, I = 4, 48, 48  # I not a multiple of the column block: descriptor reads cross the gate/up seam
    interleaved = layout != "concatenated"
    case = make_case(9, E, H, I, 2, dtype, seed=21, bias=interleaved)
    widths = torch.tensor([0, 16, 37, 48], dtype=torch.int32, device=DEVICE)
    kw = dict(activation="swiglu_clamped", interleaved=True, limit=1.0) if interleaved else {}
    cfg = _interp_config(path="grouped", tma1=True, tma2=True)
    assert rel_err(run_kernel(case, widths, cfg, **kw), reference(case, widths, **kw)) < TOL[dtype]


@pytest.mark.parametrize("split_slots", [True, False], ids=["split", "fused_slots"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("batch", [1, 7])
def test_gemv_path_matches_reference(batch, top_k, split_slots):
    E, H, I = 8, 48, 64
    dtype = torch.float16 if top_k == 2 else torch.float32
    case = make_case(batch, E, H, I, top_k, dtype, seed=100 + batch * 10 + top_k)
    widths = width_mix(E, I, 16, seed=7 + batch + top_k)
    cfg = _interp_config(path="gemv", split_slots=split_slots)
    assert rel_err(run_kernel(case, widths, cfg), reference(case, widths)) < TOL[dtype]


def pair_width_mix(T, k, I, seed):
    """Per-pair widths ``[T, k]``: 0, odd, full and random values, so one expert's rows differ."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, I + 1, (T, k), generator=g, dtype=torch.int32)
    w.view(-1)[: min(3, T * k)] = torch.tensor([0, I, 23 % I or 1], dtype=torch.int32)[: min(3, T * k)]
    return w.to(DEVICE)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptors"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("batch, top_k", [(1, 2), (7, 2), (40, 4)])
def test_grouped_path_with_pair_widths_matches_reference(batch, top_k, bias, tma):
    """Each routed pair at its own width (tokens at several budgets in one call): a row block runs to
    its widest row, and each row stops at its own width in the down GEMM, bias only where it has any."""
    E, H, I = 4, 48, 48
    case = make_case(batch, E, H, I, top_k, torch.float32, seed=300 + batch, bias=bias)
    widths = pair_width_mix(batch, top_k, I, seed=batch)
    cfg = _interp_config(path="grouped", tma1=tma, tma2=tma)
    assert rel_err(run_kernel(case, widths, cfg), reference(case, widths)) < TOL[torch.float32]


@pytest.mark.parametrize("split_slots", [True, False], ids=["split", "fused_slots"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_gemv_path_with_pair_widths_matches_reference(bias, split_slots):
    E, H, I = 8, 48, 64
    case = make_case(5, E, H, I, 2, torch.float32, seed=400, bias=bias)
    widths = pair_width_mix(5, 2, I, seed=5)
    cfg = _interp_config(path="gemv", split_slots=split_slots)
    assert rel_err(run_kernel(case, widths, cfg), reference(case, widths)) < TOL[torch.float32]


def test_pair_widths_shared_by_each_expert_equal_per_expert_widths_in_the_kernels():
    E, H, I = 8, 32, 64
    case = make_case(9, E, H, I, 2, torch.float32, seed=500, bias=True)
    per_expert = width_mix(E, I, 16, seed=3)
    by_pair = per_expert[case["topk_ids"]]
    for path in ("grouped", "gemv"):
        cfg = _interp_config(path=path)
        torch.testing.assert_close(run_kernel(case, by_pair, cfg), run_kernel(case, per_expert, cfg),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["grouped", "gemv"])
def test_full_width_without_table(path):
    case = make_case(5, 4, 32, 32, 2, torch.float32, seed=3)
    assert rel_err(run_kernel(case, None, _interp_config(path=path)), reference(case, None)) < 1e-4


@pytest.mark.parametrize("path", ["grouped", "gemv"])
def test_all_widths_zero_gives_zero(path):
    case = make_case(6, 4, 32, 32, 2, torch.float32, seed=4, bias=True)
    out = run_kernel(case, torch.zeros(4, dtype=torch.int32, device=DEVICE), _interp_config(path=path))
    assert torch.equal(out.cpu(), torch.zeros_like(out.cpu()))


@pytest.mark.parametrize("path", ["grouped", "gemv"])
def test_width_swap_between_calls(path):
    """Swapping the width table in place between two calls: both answers right."""
    E, H, I = 8, 32, 64
    case = make_case(7, E, H, I, 2, torch.float32, seed=5)
    widths = width_mix(E, I, 16, seed=1)
    cfg = _interp_config(path=path)
    first = run_kernel(case, widths, cfg)
    assert rel_err(first, reference(case, widths)) < 1e-4
    widths.copy_(width_mix(E, I, 16, seed=2))
    second = run_kernel(case, widths, cfg)
    assert rel_err(second, reference(case, widths)) < 1e-4
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("path", ["grouped", "gemv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_bias_interleaved_transposed(path, dtype):
    """GPT-OSS layout: transposed views, interleaved gate/up, biases, clamped SwiGLU; width 0 drops the bias."""
    E, H, I = 4, 48, 32
    case = make_case(7, E, H, I, 2, dtype, seed=6, bias=True, transposed=True)
    widths = torch.tensor([0, 16, 7, 32], dtype=torch.int32, device=DEVICE)
    cfg = _interp_config(path=path)
    kw = dict(activation="swiglu_clamped", interleaved=True, alpha=1.702, limit=0.5)  # small limit: clamps bite
    out = run_kernel(case, widths, cfg, **kw)
    assert rel_err(out, reference(case, widths, **kw)) < TOL[dtype]


def test_bias_concatenated():
    case = make_case(7, 4, 32, 32, 2, torch.float32, seed=7, bias=True)
    widths = torch.tensor([32, 0, 16, 5], dtype=torch.int32, device=DEVICE)
    for path in ("grouped", "gemv"):
        out = run_kernel(case, widths, _interp_config(path=path))
        assert rel_err(out, reference(case, widths)) < 1e-4


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_activations(activation):
    case = make_case(5, 4, 32, 32, 2, torch.float32, seed=8)
    widths = torch.tensor([32, 16, 0, 9], dtype=torch.int32, device=DEVICE)
    for path in ("grouped", "gemv"):
        out = run_kernel(case, widths, _interp_config(path=path), activation=activation)
        assert rel_err(out, reference(case, widths, activation=activation)) < 1e-4


def test_granule_promise_skips_masks_and_stays_correct():
    """granule a multiple of the column block: unmasked weight reads; odd widths still right."""
    case = make_case(7, 4, 32, 64, 2, torch.float32, seed=9)
    cfg = _interp_config(path="grouped")
    for widths in ([64, 32, 0, 32], [64, 17, 0, 33]):  # the second breaks the promise: still correct
        w = torch.tensor(widths, dtype=torch.int32, device=DEVICE)
        out = run_kernel(case, w, cfg, granule=cfg.block_n1)
        assert rel_err(out, reference(case, w)) < 1e-4


def test_noncontiguous_hidden_int32_ids_int64_widths():
    case = make_case(6, 4, 32, 32, 2, torch.float32, seed=10)
    wide = torch.randn(6, 64, device=DEVICE)
    wide[:, ::2] = case["hidden"]
    case["hidden"] = wide[:, ::2]
    case["topk_ids"] = case["topk_ids"].to(torch.int32)
    widths = torch.tensor([32, 16, 0, 31], dtype=torch.int64, device=DEVICE)
    for path in ("grouped", "gemv"):
        out = run_kernel(case, widths, _interp_config(path=path))
        assert rel_err(out, reference(case, widths)) < 1e-4


def test_route_is_a_stable_counting_sort():
    mod = _kernels()
    g = torch.Generator().manual_seed(11)
    E, bm = 6, 16
    ids = torch.randint(0, E, (300, 2), generator=g)  # 600 pairs: several routing chunks
    order, meta, max_blocks = mod.route(ids.to(DEVICE), E, bm)
    flat = ids.reshape(-1)
    expected = torch.argsort(flat, stable=True)
    assert torch.equal(order.cpu().long(), expected)
    e_pad = meta.numel() // 3
    meta = meta.cpu()
    counts = torch.bincount(flat, minlength=E)
    assert torch.equal(meta[e_pad:e_pad + E].long(), counts)
    assert torch.equal(meta[:E].long(), torch.cumsum(counts, 0) - counts)
    blocks = torch.cumsum((counts + bm - 1) // bm, 0)
    assert torch.equal(meta[2 * e_pad:2 * e_pad + E].long(), blocks)
    assert max_blocks >= int(blocks[-1])


# --------------------------------------------------------------------------------------------
# dispatch, op backend, transformers, specialisation, config tables


def test_resolve_backend(monkeypatch):
    from flexc.kernels.dispatch import resolve_backend

    assert resolve_backend("auto", "cpu") == "reference"
    assert resolve_backend("reference", "cpu") == "reference"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        resolve_backend("cutlass", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", "cpu") == "triton"
    if HAS_CUDA:
        assert resolve_backend("auto", "cuda") == "triton"


def test_a_chosen_backends_forward():
    _kernels()
    from flexc.ir.backends import backend_forward

    case = make_case(5, 4, 32, 32, 2, torch.float32, seed=12)
    widths = torch.tensor([32, 0, 16, 8], dtype=torch.int32, device=DEVICE)
    ref = reference(case, widths)
    args = (case["hidden"], case["topk_ids"], case["topk_weights"], case_weights(case), widths)
    assert rel_err(backend_forward("reference", DEVICE)(*args), ref) < 1e-4
    assert rel_err(backend_forward("triton", DEVICE)(*args), ref) < 1e-4


def test_op_backend_registration():
    """The Triton path registered as the op's backend for this device type."""
    _kernels()
    from flexc.ir.backends import install_cuda_backend
    from flexc.kernels.dispatch import triton_forward

    case = make_case(7, 4, 32, 32, 2, torch.float32, seed=13)
    widths = torch.tensor([32, 0, 16, 8], dtype=torch.int32, device=DEVICE)
    ref = reference(case, widths)
    try:
        if HAS_CUDA:
            install_cuda_backend()
        else:
            register_backend("cpu", triton_forward)
        out = run_experts(case["hidden"], case["topk_ids"], case["topk_weights"], case_weights(case), widths)
        assert rel_err(out, ref) < 1e-4
    finally:
        install_cuda_backend(False)
        register_backend("cpu", None)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_transformers_experts_implementation(family):
    """The one transformers experts implementation ("flexc") runs the kernels once they are the op's backend."""
    _kernels()
    from flexc.ir.backends import install_cuda_backend
    from flexc.ir.experts_impl import IMPLEMENTATION_NAME, register
    from flexc.ir.testing import tiny_model
    from flexc.kernels import dispatch

    register()  # what flexc.load does; the test must not depend on an earlier test having done it
    model = tiny_model(family).to(DEVICE)
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(14)).to(DEVICE)
    calls = []

    def counted(*args):
        calls.append(1)
        return dispatch.triton_forward(*args)

    try:
        with torch.no_grad():
            model.set_experts_implementation("grouped_mm" if HAS_CUDA else "eager")
            ref = model(ids).logits.double()
            register_backend(torch.device(DEVICE).type, counted)
            model.set_experts_implementation(IMPLEMENTATION_NAME)
            out = model(ids).logits.double()
            assert calls, "the kernels did not run"
            assert rel_err(out, ref.cpu()) < 1e-4
            # widths through the module buffer: half of every expert
            for m in model.modules():
                if hasattr(m, "gate_up_proj") and hasattr(m, "is_transposed"):
                    m.flexc_widths = torch.full((m.num_experts,), 16, dtype=torch.int32, device=DEVICE)
            half = model(ids).logits
            assert not torch.allclose(half.double().cpu(), ref.cpu())
    finally:
        install_cuda_backend(False)
        register_backend("cpu", None)


def test_specialize_writes_standalone_source(tmp_path):
    _kernels()
    from flexc.kernels.specialize import KernelPlan, load_plan_module, specialize

    E, H, I, k = 4, 32, 64, 2
    plan = specialize(E, H, I, k, torch.float32, granule=32, device=DEVICE, tune=False)
    files = plan.write(tmp_path)
    src = files["source"].read_text()
    assert "def _gate_up_kernel" in src and "SPEC = " in src
    imports = [ln for ln in src.splitlines() if ln.startswith(("import ", "from "))]
    assert not any("flexc" in ln for ln in imports), imports
    again = KernelPlan.read(tmp_path)
    assert again.configs == plan.configs and again.granule == 32
    mod = load_plan_module(tmp_path)
    case = make_case(5, E, H, I, k, torch.float32, seed=15)
    widths = torch.tensor([64, 32, 0, 32], dtype=torch.int32, device=DEVICE)
    ref = reference(case, widths)
    out = mod.forward(*case.values(), widths)
    assert rel_err(out, ref) < 1e-4
    assert rel_err(plan.forward(*case.values(), widths), ref) < 1e-4
    with pytest.raises(ValueError):
        mod.forward(*make_case(2, E, H, 32, k, torch.float32, seed=1).values(), None)


def test_config_tables(tmp_path):
    from flexc.kernels import tuning
    from flexc.kernels.triton_experts import KernelConfig

    for path in tuning.CONFIG_DIR.glob("*.json"):  # shipped tables parse
        data = json.loads(path.read_text())
        assert data["format"] == tuning.TABLE_FORMAT
        for buckets in data["entries"].values():
            for cfg in buckets.values():
                KernelConfig.from_dict(cfg)
    assert tuning.batch_bucket(1) == 1 and tuning.batch_bucket(3) == 4 and tuning.batch_bucket(10**6) == 4096
    key = tuning.shape_key(4, 32, 64, 2, torch.bfloat16)
    cfgs = {1: KernelConfig(path="gemv"), 64: KernelConfig(block_m=32)}
    out = tuning.write_table(tmp_path / "t.json", "Test GPU", {key: cfgs})
    tuning.load_table(out)
    assert tuning.table_entries(key, "Test GPU") == cfgs
    assert tuning._pick(cfgs, 2) == cfgs[64] and tuning._pick(cfgs, 4096) == cfgs[64]
    assert tuning._pick(cfgs, 1).path == "gemv"
    cpu = tuning.lookup_config(4, 32, 64, 2, torch.float32, "cpu", 7)
    assert isinstance(cpu, KernelConfig)
    with pytest.raises(ValueError):
        KernelConfig.from_dict({"bogus": 1})


# --------------------------------------------------------------------------------------------
# CUDA only


@_apply(needs_cuda)
@pytest.mark.parametrize("path", ["grouped", "gemv"])
def test_cuda_graph_capture_and_width_swap(path):
    """The whole forward captured in a CUDA graph; swapping widths in place between replays."""
    mod = _kernels()
    E, H, I, k, T = 16, 256, 128, 4, 24
    case = make_case(T, E, H, I, k, torch.bfloat16, seed=16)
    widths = width_mix(E, I, 16, seed=3)
    cfg = mod.default_config(E, k, T).replace(path=path)
    run = lambda: mod.moe_forward(*case.values(), widths, config=cfg)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for seed in (3, 4, 5):
        widths.copy_(width_mix(E, I, 16, seed=seed))
        out.fill_(float("nan"))  # poison: every element must be rewritten by the replay
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, reference(case, widths)) < TOL[torch.bfloat16]


@_apply(needs_cuda)
def test_width_swap_does_not_recompile():
    mod = _kernels()
    E, H, I, k = 8, 128, 64, 2
    case = make_case(40, E, H, I, k, torch.bfloat16, seed=17)
    cfg = mod.default_config(E, k, 40).replace(path="grouped")
    widths = width_mix(E, I, 16, seed=1)
    mod.moe_forward(*case.values(), widths, config=cfg)
    torch.cuda.synchronize()
    seen = []
    hook = lambda *a, **kw: seen.append(kw.get("repr", "?"))  # noqa: E731
    try:
        from triton import knobs

        knobs.runtime.jit_post_compile_hook = hook
    except (ImportError, AttributeError):
        pytest.skip("this triton has no compile hook")
    try:
        for seed in (2, 3):
            widths.copy_(width_mix(E, I, 16, seed=seed))
            mod.moe_forward(*case.values(), widths, config=cfg)
        case2 = make_case(33, E, H, I, k, torch.bfloat16, seed=18)  # a new batch size: no compile either
        mod.moe_forward(*case2.values(), widths, config=cfg)
        torch.cuda.synchronize()
    finally:
        knobs.runtime.jit_post_compile_hook = None
    assert not seen


@_apply(needs_cuda)
@pytest.mark.parametrize("batch", [1, 3, 16, 100, 700])
def test_bf16_tuned_configs_on_real_shape(batch):
    """Qwen3-30B-A3B expert shape, bf16, configs from the table/heuristics for this GPU."""
    _kernels()
    from flexc.kernels.dispatch import triton_forward

    E, H, I, k = 128, 2048, 768, 8
    case = make_case(batch, E, H, I, k, torch.bfloat16, seed=19)
    widths = width_mix(E, I, 16, seed=batch)
    out = triton_forward(case["hidden"], case["topk_ids"], case["topk_weights"], case_weights(case), widths)
    assert rel_err(out, reference(case, widths)) < TOL[torch.bfloat16]
