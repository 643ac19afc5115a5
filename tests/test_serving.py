"""flexc artifacts served by vLLM (its CPU build) through flexc's plugin, against flexc.load.

For each family (Qwen3-MoE, Mixtral, Qwen2-MoE with its shared expert) one engine is started on
a nested artifact at keep 0.75 (chosen at load through ``hf_overrides``); its greedy tokens must
equal ``flexc.load`` + transformers at that budget, then, switched live with
``flexc.serving.set_budget`` (no reload), at keep 0.4 and at full width; and, with per-request
budgets, requests naming different budgets in one batch must each get their own budget's tokens.
A sliced checkpoint must be served at its widths, and a budget switch on it refused.

Needs vLLM: tests/test_serving_suite.py builds an environment with the ``serve-cpu`` extra and
runs this file there (vLLM's CPU build pins transformers and torch; see docs/serving.md). Without
vLLM the module is skipped.
"""

from __future__ import annotations

import json
import gc
import os

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: serving tests run where the serve-cpu extra is "
                                   "installed (tests/test_serving_suite.py runs this file in vLLM's environment)")

import torch  # noqa: E402

from serving_artifacts import ADAPTIVE, BUDGETS, source_model, write_artifacts  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = ["def main():\n    ", "import os\nimport sys\n", "class Config:\n    def __init__(self"]
MAX_TOKENS = 12
MODELS = ["tiny", "mixtral-tiny", "qwen2-moe"]


def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p).input_ids for p in PROMPTS]


def reference(directory, budget, ids, adaptive: bool = False) -> list[list[int]]:
    """Greedy tokens of flexc.load (transformers) at ``budget`` (None: full width; ``adaptive``: on the
    artifact's token-adaptive policy)."""
    import flexc

    model = flexc.load(str(directory), budget=budget, adaptive=adaptive)
    out = []
    with torch.no_grad():
        for row in ids:
            x = torch.tensor([row])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS, do_sample=False,
                               pad_token_id=0)
            out.append(y[0, x.shape[1]:].tolist())
    return out


def start_engine(directory, enforce_eager: bool = True, **kwargs):
    from vllm import LLM

    return LLM(model=str(directory), dtype="float32", enforce_eager=enforce_eager, max_model_len=256,
               kv_cache_memory_bytes=64 << 20, seed=0, **kwargs)


def served(llm, ids) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": row} for row in ids], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _shutdown(llm) -> None:
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Per model: the artifact paths, the prompts' token ids and flexc.load's tokens per budget."""
    built = {}
    for name in MODELS:
        model, tokenizer = source_model(name)
        paths = write_artifacts(model, tokenizer, tmp_path_factory.mktemp(f"serve-{name}"))
        ids = prompt_ids(tokenizer)
        refs = {b: reference(paths["nested"], b, ids) for b in (None, *BUDGETS)}
        refs[ADAPTIVE] = reference(paths["nested"], BUDGETS[1], ids, adaptive=True)
        built[name] = (paths, ids, refs)
    return built


@pytest.fixture(scope="module", params=MODELS)
def engine(request, artifacts):
    """One engine per model, started at keep 0.75 on the nested artifact (closed after its tests), with
    per-request budgets enabled (flexc's logits processor; prefix caching off)."""
    from flexc.serving.requests import PROCESSOR

    paths, ids, refs = artifacts[request.param]
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    llm = start_engine(paths["nested"], hf_overrides={"flexc_budget": BUDGETS[0]}, logits_processors=[PROCESSOR],
                       enable_prefix_caching=False)
    yield request.param, llm, ids, refs
    _shutdown(llm)


def test_references_differ_between_budgets(artifacts):
    """Otherwise the equality tests below could not tell the budgets apart."""
    for name, (_, _, refs) in artifacts.items():
        outputs = [refs[b] for b in (None, *BUDGETS)]
        assert outputs[0] != outputs[1] and outputs[1] != outputs[2] and outputs[0] != outputs[2], name


def test_budget_chosen_at_load_and_switched_live(engine):
    from flexc.serving import get_budget, set_budget

    name, llm, ids, refs = engine
    state = get_budget(llm)
    assert state["kind"] == "nested" and state["budget"] == pytest.approx(BUDGETS[0])
    assert state["budgets"] == [1.0, *BUDGETS]
    assert state["experts_kernel"] == ["vllm"]  # the engine's budget on vLLM's CPU kernel (packed prefixes)
    assert served(llm, ids) == refs[BUDGETS[0]], f"{name} at keep {BUDGETS[0]} (chosen at load)"

    switched = set_budget(llm, BUDGETS[1])  # the same engine: nothing reloaded
    assert switched["budget"] == pytest.approx(BUDGETS[1]) and switched["switch_s"] < 0.5
    assert served(llm, ids) == refs[BUDGETS[1]], f"{name} at keep {BUDGETS[1]} after a live switch"

    full = set_budget(llm, 1.0)
    assert served(llm, ids) == refs[None], f"{name} at full width after a live switch"
    # The packed copy holds each expert's kept channels (rounded up to vLLM's 32), no more: its bytes
    # scale with the table's channels.
    def channels(state):
        return sum(-(-w // 32) * 32 for row in state["widths"].values() for w in row)
    assert switched["packed_bytes"] / full["packed_bytes"] == pytest.approx(channels(switched) / channels(full))


def test_the_nested_engine_budget_on_vllms_kernel_equals_flexcs_op():
    """One layer at mixed widths (removed experts, widths off vLLM's 32 grid) from 1 token to prefill
    sizes: the packed buckets on vLLM's CPU kernel compute what flexc's op computes on the nested weights."""
    from flexc.ir.op import ExpertLayout, ExpertWeights, run_experts
    from flexc.serving.packed import PackedLayer, cpu_kernel_isa

    gen = torch.Generator().manual_seed(0)
    experts, inner, hidden, k = 16, 256, 128, 4
    gate_up = torch.randn(experts, 2 * inner, hidden, generator=gen) / 16
    down = torch.randn(experts, hidden, inner, generator=gen) / 16
    weights = ExpertWeights(gate_up, down, layout=ExpertLayout("silu", False, 1.0, 0.0))
    isa = cpu_kernel_isa(torch.float32, hidden, "silu", torch.device("cpu"))
    assert isa is not None
    for widths in ([256] * experts, [256, 128, 0, 48, 128, 256, 32, 64, 0, 256, 160, 128, 200, 16, 256, 96]):
        layer = PackedLayer(gate_up, down, widths, k, isa, "silu")
        assert layer.routing.whole == (len(set(widths)) == 1)
        for tokens in (1, 8, 17, 300):  # host-planned decode sizes, then bucketed rows
            x = torch.randn(tokens, hidden, generator=gen)
            ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
            routing = torch.rand(tokens, k, generator=gen)
            expected = run_experts(x, ids, routing, weights, torch.tensor(widths, dtype=torch.int32))
            torch.testing.assert_close(layer(x, ids, routing), expected, rtol=1e-4, atol=1e-5)


def test_pairs_at_any_width_on_the_cuts_run_in_one_call_on_vllms_kernel():
    """Per-request batches and adaptive widths: each routed pair at a width of its own (``[T, k]``, or one table
    ``[E]``), run as its expert's 32-channel pieces (cut also at the tables' widths off that grid) in one
    kernel call: flexc's op on the nested weights computes the same; a width off the cuts is left to
    flexc's op (None)."""
    from flexc.ir.op import ExpertLayout, ExpertWeights, run_experts
    from flexc.serving.packed import PackedPieces, cpu_kernel_isa, pieces_nbytes

    gen = torch.Generator().manual_seed(1)
    experts, inner, hidden, k = 8, 128, 64, 2
    gate_up = torch.randn(experts, 2 * inner, hidden, generator=gen) / 8
    down = torch.randn(experts, hidden, inner, generator=gen) / 8
    weights = ExpertWeights(gate_up, down, layout=ExpertLayout("silu", False, 1.0, 0.0))
    rows = [[128] * experts, [128, 96, 64, 64, 32, 128, 96, 64], [64, 32, 0, 32, 16, 96, 48, 0]]
    pieces = PackedPieces(gate_up, down, rows, cpu_kernel_isa(torch.float32, hidden, "silu", torch.device("cpu")),
                          "silu")
    assert pieces.nbytes() == pieces_nbytes(rows, inner, hidden, torch.float32) == 3 * 32 * hidden * 4 * (8 * 4 + 3)
    table = torch.tensor(rows, dtype=torch.int32)
    for tokens in (1, 3, 40, 300):
        x = torch.randn(tokens, hidden, generator=gen)
        ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
        routing = torch.rand(tokens, k, generator=gen)
        budget = torch.randint(0, len(rows), (tokens,), generator=gen)
        for widths in (table[budget[:, None], ids], table[2], torch.full((tokens, k), 96, dtype=torch.int32),
                       torch.zeros(tokens, k, dtype=torch.int32)):
            torch.testing.assert_close(pieces(x, ids, routing, widths), run_experts(x, ids, routing, weights, widths),
                                       rtol=1e-4, atol=1e-5)
        assert pieces(x, ids, routing, torch.full((tokens, k), 40, dtype=torch.int32)) is None


def test_the_engine_budget_runs_on_flexcs_op_when_asked(artifacts):
    """``flexc_experts_kernel: flexc``: no packed copy, the same tokens."""
    from flexc.serving import get_budget, set_budget

    paths, ids, refs = artifacts["tiny"]
    llm = start_engine(paths["nested"], hf_overrides={"flexc_budget": BUDGETS[1], "flexc_experts_kernel": "flexc"})
    try:
        state = get_budget(llm)
        assert state["experts_kernel"] == ["flexc"] and state["packed_bytes"] == 0
        assert served(llm, ids) == refs[BUDGETS[1]]
        assert set_budget(llm, BUDGETS[0])["packed_bytes"] == 0
        assert served(llm, ids) == refs[BUDGETS[0]]
    finally:
        _shutdown(llm)


def test_the_adaptive_policy_is_served_as_flexc_load_runs_it(engine):
    """Each routed pair's width from its routing weight, switched on and off live."""
    from flexc.serving import get_budget, set_budget

    name, llm, ids, refs = engine
    assert refs[ADAPTIVE] != refs[BUDGETS[1]], f"{name}: the policy must change some pair's width"
    state = set_budget(llm, BUDGETS[1], adaptive=True)
    assert state["adaptive"] and state["budget"] == pytest.approx(BUDGETS[1])
    assert state["pieces_bytes"] > 0  # the policy's widths per pair run on vLLM's kernel, the experts in pieces
    assert served(llm, ids) == refs[ADAPTIVE], f"{name} at keep {BUDGETS[1]}, adaptive"
    set_budget(llm, BUDGETS[1])
    assert not get_budget(llm)["adaptive"]
    assert served(llm, ids) == refs[BUDGETS[1]], f"{name} at keep {BUDGETS[1]}, the static table again"
    set_budget(llm, BUDGETS[0])


def test_unknown_budget_is_refused_and_leaves_the_engine_serving(engine):
    from flexc.serving import get_budget, set_budget

    name, llm, ids, refs = engine
    before = get_budget(llm)["budget"]
    with pytest.raises(Exception, match=r"no width table for keep 0\.33.*available: 1, 0\.75, 0\.4"):
        set_budget(llm, 0.33)
    assert get_budget(llm)["budget"] == before
    assert served(llm, ids[:1]) == refs[None if before == 1.0 else before][:1]


def test_requests_of_different_budgets_share_one_batch(engine):
    """Each request names its budget: three prompts at three budgets, submitted together (one forward
    pass runs all three budgets), each gives flexc.load's tokens at its own budget; a request naming a
    budget the artifact lacks runs at the largest exported one below it; a keep outside (0, 1] is
    refused on admission."""
    from vllm import SamplingParams

    from flexc.serving import get_budget, set_budget

    name, llm, ids, refs = engine
    engine_only = set_budget(llm, BUDGETS[0])["packed_bytes"]  # the engine's budget, for requests naming none
    assert engine_only > 0

    def params(budget):
        return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                              extra_args=None if budget is None else {"flexc_budget": budget})

    def run(budgets):
        outs = llm.generate([{"prompt_token_ids": row} for row in ids], [params(b) for b in budgets], use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    assert run([BUDGETS[1], None, 1.0]) == [refs[BUDGETS[1]][0], refs[BUDGETS[0]][1], refs[None][2]], name
    assert get_budget(llm)["most_budgets_in_a_pass"] == 3  # the three budgets ran in one forward pass
    state = get_budget(llm)
    assert state["packed_bytes"] == engine_only  # the engine budget's copy stays as it was
    assert state["pieces_bytes"] > engine_only  # the experts packed in pieces for vLLM's kernel (all channels)
    assert run([1.0, BUDGETS[1], 0.5]) == [refs[None][0], refs[BUDGETS[1]][1], refs[BUDGETS[1]][2]], name
    assert get_budget(llm)["budget"] == pytest.approx(BUDGETS[0])  # the engine's own budget is untouched
    with pytest.raises(Exception, match=r"flexc_budget must be a keep ratio in \(0, 1\]; got 1.5"):
        llm.generate([{"prompt_token_ids": ids[0]}], params(1.5), use_tqdm=False)
    assert run([None, None, None]) == [refs[BUDGETS[0]][i] for i in range(3)], name


def test_requests_choose_the_adaptive_policy_or_the_static_table_in_one_batch(engine):
    """A request may ask for the adaptive policy at its budget (``flexc_adaptive``) beside requests on static
    tables in the same batch; a request that does not say runs as the engine does (adaptive or not), also when
    others in its batch ask for something else."""
    from vllm import SamplingParams

    from flexc.serving import get_budget, set_budget

    name, llm, ids, refs = engine
    assert refs[ADAPTIVE][0] != refs[BUDGETS[1]][0], f"{name}: the policy must change the first prompt's tokens"

    def run(asks):
        params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=extra or None)
                  for extra in asks]
        outs = llm.generate([{"prompt_token_ids": row} for row in ids], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    set_budget(llm, BUDGETS[0])  # a static engine: one request asks for the policy at the lower budget
    assert run([{"flexc_budget": BUDGETS[1], "flexc_adaptive": True}, {}, {"flexc_budget": BUDGETS[1]}]) == [
        refs[ADAPTIVE][0], refs[BUDGETS[0]][1], refs[BUDGETS[1]][2]], name
    assert get_budget(llm)["most_budgets_in_a_pass"] >= 3  # (0.4, adaptive), (0.75, static), (0.4, static)
    set_budget(llm, BUDGETS[1], adaptive=True)  # an adaptive engine: requests that do not say run the policy
    assert run([{}, {"flexc_adaptive": False}, {"flexc_budget": 1.0}]) == [
        refs[ADAPTIVE][0], refs[BUDGETS[1]][1], refs[None][2]], name
    with pytest.raises(Exception, match="flexc_adaptive must be true or false; got 'yes'"):
        run([{"flexc_adaptive": "yes"}, {}, {}])
    set_budget(llm, BUDGETS[0])


@pytest.mark.parametrize("graphs, caching, message", [(True, False, "CUDA graphs"), (False, True, "prefix caching off")])
def test_per_request_budgets_refuse_what_would_mix_budgets(monkeypatch, graphs, caching, message):
    """Captured CUDA graphs would replay one pass's grouping by budget; with prefix caching a KV block of one
    budget could serve another: the processor refuses both at start (a compiled engine on CPU, which
    captures no graphs, is accepted)."""
    from types import SimpleNamespace

    from vllm.config import CompilationMode
    from vllm.platforms import current_platform

    from flexc.serving.requests import FlexcBudgets

    def config(caching: bool):
        return SimpleNamespace(compilation_config=SimpleNamespace(mode=CompilationMode.VLLM_COMPILE),
                               cache_config=SimpleNamespace(enable_prefix_caching=caching))

    FlexcBudgets(config(False), torch.device("cpu"), False)
    if graphs:
        monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    with pytest.raises(ValueError, match=message):
        FlexcBudgets(config(caching), torch.device("cpu"), False)


def test_a_compiled_engine_runs_budgets_per_request_budgets_and_the_policy_as_an_eager_one(artifacts):
    """vLLM's default mode (torch.compile): the routed experts run as flexc's opaque op, so the engine budget
    runs on vLLM's kernel, switches live, and per-request budgets and the adaptive policy give flexc.load's
    tokens, as in an eager engine."""
    from vllm import SamplingParams

    from flexc.serving import get_budget, set_budget
    from flexc.serving.requests import PROCESSOR

    paths, ids, refs = artifacts["tiny"]
    llm = start_engine(paths["nested"], enforce_eager=False, hf_overrides={"flexc_budget": BUDGETS[0]},
                       logits_processors=[PROCESSOR], enable_prefix_caching=False)
    try:
        assert get_budget(llm)["experts_kernel"] == ["vllm"]
        assert served(llm, ids) == refs[BUDGETS[0]]
        set_budget(llm, BUDGETS[1])
        assert served(llm, ids) == refs[BUDGETS[1]]
        params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                 extra_args=None if b is None else {"flexc_budget": b}) for b in (BUDGETS[0], None, 1.0)]
        outs = llm.generate([{"prompt_token_ids": row} for row in ids], params, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == [refs[BUDGETS[0]][0], refs[BUDGETS[1]][1],
                                                                refs[None][2]]
        assert get_budget(llm)["most_budgets_in_a_pass"] == 3
        set_budget(llm, BUDGETS[1], adaptive=True)
        assert served(llm, ids) == refs[ADAPTIVE]
    finally:
        _shutdown(llm)


@pytest.mark.parametrize("name", MODELS)
def test_sliced_checkpoint_is_served_on_vllms_kernels_at_its_widths(artifacts, name):
    """A sliced checkpoint (experts stored by width bucket) is served by flexc's class with each bucket
    on vLLM's own fused-MoE kernels, equal to the nested model at its budget; its budget cannot be
    switched."""
    from flexc.serving import get_budget, set_budget

    paths, ids, refs = artifacts[name]
    budget = BUDGETS[1]
    llm = start_engine(paths[f"keep_{budget:.2f}"])
    try:
        state = get_budget(llm)
        assert state["kind"] == "sliced" and state["budget"] == pytest.approx(budget)
        assert state["experts_kernel"] == ["vllm"]
        assert max(len(b) for b in state["buckets"].values()) > 1  # several buckets: several vLLM calls per layer
        assert served(llm, ids) == refs[budget]
        with pytest.raises(Exception, match="sliced checkpoint of keep 0.4: its budget is fixed"):
            set_budget(llm, BUDGETS[0])
    finally:
        _shutdown(llm)


def vllm_runs_int4_experts_here() -> bool:
    """Whether vLLM's own int4 MoE kernel runs on this machine (its CPU one: x86 with AMX)."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsInt4

    return CPUExpertsInt4._supports_current_device()


@pytest.mark.parametrize("group", [32, 64])
def test_quantized_sliced_checkpoint_is_served_with_flexc_loads_tokens(tmp_path, group):
    """A w4a16 sliced checkpoint (packed codes and group scales by width bucket) is served by the plugin with
    the same greedy tokens as ``flexc.load`` of the same checkpoint (flexc's modeling code, dequantizing per
    expert). Groups of 64 run on vLLM's own int4 MoE kernel (its compressed-tensors WNA16 method, packed codes
    as stored) where it runs here (x86 with AMX); groups of 32, which it refuses, and every group where it
    does not run, are dequantized as they load onto its unquantized kernels."""
    from flexc.export.sliced import write_sliced
    from flexc.ir.experts_impl import canonical_weights
    from flexc.ir.groups import find_expert_groups
    from flexc.ir.quant.nested import quantize_rtn
    from flexc.ir.quant.scheme import QuantScheme
    from flexc.serving import get_budget
    from flexc.serving.buckets import HOST_PLANNED_PAIRS

    model, tokenizer = source_model("tiny")
    groups = find_expert_groups(model)
    scheme, scales = QuantScheme("w4a16", group), {}
    for g in groups:
        gate_up, down = canonical_weights(model.get_submodule(g.path))
        q_gate_up, q_down = quantize_rtn(gate_up, scheme), quantize_rtn(down, scheme)
        with torch.no_grad():
            gate_up.copy_(q_gate_up.dequantized())
            down.copy_(q_down.dequantized())
        scales[f"layer{g.layer}"] = {"gate_up": q_gate_up.scales, "down": q_down.scales}
    full = groups[0].intermediate_size
    half = max(group, full // 2 // group * group)
    row = [full, max(full - group, group), group, half, 0, full, group, half][: groups[0].num_experts]
    widths = torch.tensor([row[i:] + row[:i] for i in range(len(groups))])  # several buckets per layer
    target = tmp_path / "keep"
    write_sliced(target, model, groups, widths, budget=0.5, tokenizer=tokenizer,
                 quantization={**scheme.to_dict(), "method": "rtn", "scales": scales})
    # and a prompt long enough that its prefill runs the buckets as rows, not planned on the host
    ids = prompt_ids(tokenizer) + [tokenizer("for name in sorted(os.listdir(path)):\n" * 6).input_ids]
    assert len(ids[-1]) * model.config.num_experts_per_tok > HOST_PLANNED_PAIRS
    expected = reference(target, None, ids)
    llm = start_engine(target)
    try:
        state = get_budget(llm)
        assert state["kind"] == "sliced"
        assert max(len(b) for b in state["buckets"].values()) > 1
        on_int4 = group == 64 and vllm_runs_int4_experts_here()
        assert state["experts_kernel"] == (["vllm-w4a16"] if on_int4 else ["vllm"])
        assert served(llm, ids) == expected
    finally:
        _shutdown(llm)


def test_sliced_checkpoint_whose_buckets_disagree_with_its_config_is_refused(artifacts, tmp_path, monkeypatch):
    """An edited config (one expert's width changed, its buckets left as exported) is refused at load
    with a message naming the file, not served with weights in the wrong experts."""
    import shutil

    paths, _, _ = artifacts["tiny"]
    copy = tmp_path / "edited"
    shutil.copytree(paths[f"keep_{BUDGETS[1]:.2f}"], copy)
    config = json.loads((copy / "config.json").read_text())
    entry = next(iter(config["flexc_sliced"]["experts"].values()))
    kept = next(e for e, w in enumerate(entry["widths"]) if w > 16)
    entry["widths"][kept] -= 16
    (copy / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine's error reaches this process
    with pytest.raises(Exception, match=r"config.json, decoder layer 0: the config's buckets .* are not the width "
                       r"buckets of its widths"):
        start_engine(copy)


def test_without_the_plugin_vllm_refuses_a_sliced_checkpoint(artifacts):
    """With flexc's plugin turned off, vLLM's Transformers backend would serve the sliced class's
    remote code with its own fused experts, ignoring the slicing (wrong tokens, no error); the
    class declares itself incompatible, so vLLM refuses it instead."""
    import subprocess
    import sys

    paths, _, _ = artifacts["tiny"]
    code = ("from vllm import LLM\n"
            f"LLM(model={str(paths[f'keep_{BUDGETS[1]:.2f}'])!r}, dtype='float32', enforce_eager=True, "
            "max_model_len=256, kv_cache_memory_bytes=64 << 20, trust_remote_code=True)\n")
    env = {**os.environ, "VLLM_PLUGINS": "none", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "['FlexcSlicedQwen3MoeForCausalLM'] are not supported" in done.stdout + done.stderr


def test_sliced_checkpoint_of_an_unserved_family_is_refused(tmp_path, monkeypatch):
    """vLLM's Transformers backend would load an OLMoE sliced checkpoint and drop its packed
    experts (silently wrong tokens); the plugin refuses it instead, naming what it serves."""
    from flexc.export.sliced import write_sliced
    from flexc.ir.families import detect_family
    from flexc.ir.groups import find_expert_groups
    from flexc.ir.testing import tiny_model
    from transformers import AutoTokenizer

    import flexc.zoo

    model = tiny_model("olmoe", vocab_size=2048, hidden_size=128, max_position_embeddings=512)
    groups = find_expert_groups(model, detect_family(model.config))
    widths = torch.stack([torch.full((g.num_experts,), g.intermediate_size // 2) for g in groups])
    write_sliced(tmp_path, model, groups, widths, budget=0.5,
                 tokenizer=AutoTokenizer.from_pretrained(flexc.zoo.resolve("tiny", progress=False)))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine's error reaches this process
    with pytest.raises(Exception, match="flexc sliced checkpoint of 'olmoe'.*does not serve"):
        start_engine(tmp_path, trust_remote_code=True)
