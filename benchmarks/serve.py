"""Serving speed in vLLM: flexc artifacts beside stock vLLM, in one run on one machine.

Engines, each measured the same way:

- **stock vLLM** on the unpruned checkpoint (vLLM's own fused-MoE layer);
- **flexc nested, uniform**: the zoo model's weights with uniform widths (every expert keeps the
  same prefix, so each keep ratio is exact), switched live through keep 1 / 0.75 / 0.5 / 0.25;
- **flexc nested, learned**: a default compile's nested artifact (the README's pipeline:
  rank_channels, insert_action_gates, anneal, fold_masks, then adaptive_widths for its
  token-adaptive policy; learned per-expert widths under the spec's default grid and bucket
  bound), switched live through its budgets. The engine's budget runs on vLLM's CPU experts
  kernel, each switch packing the kept prefixes (docs/serving.md); ``--flexc-op`` adds the same
  artifact on flexc's op (``flexc_experts_kernel: flexc``) as rows of its own;
- **flexc nested, learned, adaptive**: the same engine on the artifact's token-adaptive policy
  at each budget below 1 (a width per routed pair from its routing weight, flexc's op; the
  *ideal* column is the static table's, whose active keep the policy is calibrated to);
- **flexc sliced**: the same compile's sliced checkpoints (experts stored by width bucket), one
  engine each, every bucket on vLLM's own fused-MoE kernel (``--sliced-from RUN``: another
  compile's too, e.g. the same tables after ``quantize``; a quantized checkpoint's row names its
  scheme and the kernel that ran it, vLLM's int4 one where it runs, docs/serving.md).

Per engine/budget: prefill throughput (8 prompts of ``--prefill-len`` tokens, one output token),
decode throughput and per-token latency at batch 1 and 8, each the median of ``--repeats`` runs;
the ratio to stock (stock vLLM's engine stays up and every timing of a flexc engine is paired with
one of stock's taken just before or after it, the order alternating; the ratio is the median of
the pairs' ratios: this machine's speed drifts by tens of percent between minutes) and the
*ideal* ratio beside it (active parameters per token, unpruned over
pruned: the FLOPs and, at batch 1, the bytes a token touches; every expert of a layer counted as
routed to equally) and, where the nested artifact's adaptive report measured it, the ideal *as
routed* (the routed experts at the table's active keep on held-out text: a learned table keeps the
experts the tokens use most widest, so tokens compute with more than the parameter keep), the
checkpoint's bytes and, for a nested engine on vLLM's kernel, the bytes of its packed copy of the
budget's experts. Then a *mixed* batch on the uniform artifact: 8 requests decoding together, each
naming its own budget (1, 0.75, 0.5, 0.25, twice; per-request budgets, docs/serving.md), each
repeat paired with the same requests at one budget, their mean keep (the engine's budget), and
with stock. Where the learned artifact has a token-adaptive policy, one more engine on it (with the
per-request processor) decodes 8 requests at keep 0.5 on the static table, on the policy
(``"flexc_adaptive": true``) and half and half in one batch. Then the switch time against an engine restart. ``--compiled`` runs every engine in
vLLM's default mode (torch.compile) instead of eager. Prefix caching is off in every engine (the repeats send the same prompts).

    python benchmarks/serve.py                       # zoo `small`, CPU (tens of minutes on 2 cores)
    python benchmarks/serve.py --model tiny --repeats 1
    python benchmarks/serve.py --run runs/x          # an existing compile's nested/ and sliced/
    python benchmarks/serve.py --run runs/x --sliced-from runs/x-w4a16 --skip uniform,learned,policy-mix \
        --dtype bfloat16 --out benchmarks/results/serve_quantized.json

Needs vLLM (the ``serve-cpu`` extra, docs/serving.md). Prints a table and writes
``benchmarks/results/serve.json`` and ``serve.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
KEEPS = (0.75, 0.5, 0.25)
MIXED = (1.0, 0.75, 0.5, 0.25)  # the mixed batch's budgets, two requests each; the uniform artifact adds their mean
GRANULE = 16


def uniform_artifact(model_name: str, out: Path, keeps=KEEPS) -> Path:
    """The zoo model as a nested artifact with uniform widths at ``keeps``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import flexc.zoo
    from flexc.export.nested import write_nested
    from flexc.ir.families import detect_family
    from flexc.ir.groups import find_expert_groups
    from flexc.ir.tables import WidthTables

    source = flexc.zoo.resolve(model_name)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    groups = find_expert_groups(model, detect_family(model.config))
    experts = max(g.num_experts for g in groups)
    tables = torch.zeros(len(keeps), len(groups), experts, dtype=torch.int32)
    for b, keep in enumerate(keeps):
        for i, g in enumerate(groups):
            tables[b, i, : g.num_experts] = max(GRANULE, round(keep * g.intermediate_size / GRANULE) * GRANULE)
    write_nested(out, model, groups, WidthTables(list(keeps), tables, "params", [g.layer for g in groups],
                                                 [g.intermediate_size for g in groups]),
                 tokenizer=AutoTokenizer.from_pretrained(source))
    return source


def active_params(manifest: dict, config: dict, widths) -> float:
    """Parameters one token computes with: all but the input embedding (a lookup) and the
    unrouted experts; the routed experts at their mean width times top-k."""
    layers = manifest["layers"]
    embedding = 0 if config.get("tie_word_embeddings") else config["vocab_size"] * config["hidden_size"]
    total = manifest["full"]["total_params"] - manifest["full"]["routed_params"] - embedding
    routed = 0.0
    for layer, row in zip(layers, widths):
        mean_width = sum(row[: layer["num_experts"]]) / layer["num_experts"]
        routed += layer["top_k"] * mean_width * layer["hidden_size"] * 3
    return total + routed


def routed_keeps(nested: Path) -> dict[float, float]:
    """Each budget's *active* keep on held-out text (mean routed-pair width over the full width, as the
    tokens route), where the artifact's adaptive policy measured it (its report's static tables): a
    learned table keeps the experts tokens use most widest, so a token computes with more than the
    parameter keep says."""
    path = nested / "flexc_adaptive.json"
    if not path.is_file():
        return {}
    held = json.loads(path.read_text()).get("report", {}).get("held_out", {})
    return {float(b): row["static_keep"] for b, row in held.items() if "static_keep" in row}


def routed_active_params(manifest: dict, config: dict, active_keep: float) -> float:
    """:func:`active_params` with the routed experts at ``active_keep`` of their full width, as routed."""
    full = [[layer["intermediate_size"]] * layer["num_experts"] for layer in manifest["layers"]]
    everything = active_params(manifest, config, full)
    routed = sum(layer["top_k"] * layer["intermediate_size"] * layer["hidden_size"] * 3
                 for layer in manifest["layers"])
    return everything - routed * (1 - active_keep)


DECODE_PROMPTS = [[200 + (i * 11 + j) % 1500 for j in range(16)] for i in range(8)]


def _timed(llm, prompts, max_tokens, extra=None) -> float:
    """Seconds to generate ``max_tokens`` for every prompt at once (``extra``: each request's ``extra_args``,
    e.g. ``{"flexc_budget": 0.5}``)."""
    from vllm import SamplingParams

    extra = extra or [None] * len(prompts)
    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=e or None)
              for e in extra]
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start


def measure_mixed(llm, args, budgets: list[float], mean_keep: float) -> dict:
    """Decode throughput of 8 requests decoding together, request i at ``budgets[i]``, each repeat beside
    the same 8 requests at one budget (the engine's, set to ``mean_keep``) and beside stock vLLM; the
    ratios are medians of the repeats' ratios."""
    from flexc.serving import set_budget

    set_budget(llm, mean_keep)
    mixed, one, stock = [], [], []
    for repeat in range(args.repeats):
        runs = [(mixed, [{"flexc_budget": b} for b in budgets]), (one, None)] + (
            [(stock, None)] if STOCK[0] is not None else [])
        for times, named in runs[:: 1 if repeat % 2 == 0 else -1]:  # alternate the order against drift
            times.append(_timed(STOCK[0] if times is stock else llm, DECODE_PROMPTS, args.decode_len, named))
    out = {"decode_b8_tok_s": 8 * args.decode_len / statistics.median(mixed),
           "decode_b8_ms_per_step": 1e3 * statistics.median(mixed) / args.decode_len,
           "one_budget_b8_tok_s": 8 * args.decode_len / statistics.median(one),
           "vs_one_budget": statistics.median(o / m for o, m in zip(one, mixed))}
    if stock:
        out["ratio_b8"] = statistics.median(s / m for s, m in zip(stock, mixed))
    return out


def measure_policy_mix(llm, args, keep: float) -> dict:
    """Decode throughput of 8 requests at ``keep`` (the engine's budget) decoding together: all on the static
    table, all on the adaptive policy (``"flexc_adaptive": true``), and half of each in one batch; the repeats
    alternate the order, and the ratios to the static batch are medians of the repeats' ratios."""
    from flexc.serving import set_budget

    set_budget(llm, keep)
    cases = {"static": None, "adaptive": [{"flexc_adaptive": True}] * 8,
             "mixed": [{"flexc_adaptive": True} if i % 2 else {} for i in range(8)]}
    times = {name: [] for name in cases}
    _timed(llm, DECODE_PROMPTS, 4, cases["mixed"])  # warm-up: packs the pieces a mixed pass runs on
    for repeat in range(args.repeats):
        for name in (list(cases) if repeat % 2 == 0 else reversed(list(cases))):
            times[name].append(_timed(llm, DECODE_PROMPTS, args.decode_len, cases[name]))
    out = {"keep": keep, **{f"{name}_b8_tok_s": 8 * args.decode_len / statistics.median(t) for name, t in times.items()}}
    out.update({f"{name}_vs_static": statistics.median(s / t for s, t in zip(times["static"], times[name]))
                for name in ("adaptive", "mixed")})
    return out


def measure(llm, args) -> dict:
    """Prefill throughput (8 prompts), decode throughput and per-step latency at batch 1 and 8; for a flexc
    engine, each repeat beside stock vLLM's (kept running, :data:`STOCK`), the order alternating, and
    ``paired``: each throughput's ratio to stock, the median of the repeats' ratios (this machine's speed
    drifts by tens of percent between minutes; a ratio of timings taken seconds apart does not)."""
    prefill_prompts = [[100 + (i * 7 + j) % 1500 for j in range(args.prefill_len)] for i in range(8)]
    cases = {"prefill": (prefill_prompts, 1), "decode_b1": (DECODE_PROMPTS[:1], args.decode_len),
             "decode_b8": (DECODE_PROMPTS, args.decode_len)}
    engines = [llm] if STOCK[0] is None or STOCK[0] is llm else [llm, STOCK[0]]
    _timed(llm, DECODE_PROMPTS[:1], 4)  # warm-up
    times = {(name, i): [] for name in cases for i in range(len(engines))}
    for repeat in range(args.repeats):
        for name, (prompts, tokens) in cases.items():
            order = range(len(engines)) if repeat % 2 == 0 else reversed(range(len(engines)))
            for i in order:
                times[(name, i)].append(_timed(engines[i], prompts, tokens))
    out = {"prefill_tok_s": 8 * args.prefill_len / statistics.median(times[("prefill", 0)])}
    for batch in (1, 8):
        seconds = statistics.median(times[(f"decode_b{batch}", 0)])
        out[f"decode_b{batch}_tok_s"] = batch * args.decode_len / seconds
        out[f"decode_b{batch}_ms_per_step"] = 1e3 * seconds / args.decode_len
    if len(engines) == 2:
        out["paired"] = {f"{name}_tok_s": statistics.median(s / f for f, s in zip(times[(name, 0)], times[(name, 1)]))
                         for name in cases}
    return out


STOCK = [None]  # stock vLLM's engine, kept running: every flexc measurement is paired with its own


EAGER = [True]  # --compiled: every engine in vLLM's default mode (torch.compile) instead
DTYPE = ["float32"]  # --dtype: every engine's


def start(model: str, **kwargs):
    from vllm import LLM

    begin = time.perf_counter()
    llm = LLM(model=model, dtype=DTYPE[0], enforce_eager=EAGER[0], max_model_len=512, seed=0,
              kv_cache_memory_bytes=256 << 20, enable_prefix_caching=False, **kwargs)
    return llm, time.perf_counter() - begin


def shutdown(llm) -> None:
    import gc

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()
    del llm
    gc.collect()


def compiled_run(model_name: str, out: Path, keeps=KEEPS) -> Path:
    """A default compile of the zoo model (the README's pipeline, the spec's default grid and bucket
    bound) with nested and sliced exports, into ``out``."""
    import flexc
    import flexc.zoo

    seq_len = json.loads((flexc.zoo.resolve(model_name) / "manifest.json").read_text())["recipe"]["seq_len"]
    spec = flexc.Spec.model_validate({
        "model": {"zoo": model_name, "dtype": "float32"},
        "data": {"calibration": {"builtin": "python-stdlib", "split": "train", "num_samples": 64, "seq_len": seq_len,
                                 "batch_size": 8}},
        "budgets": {"keep": list(keeps)},
        "pipeline": [{"rank_channels": {"score": "taylor"}}, "insert_action_gates", "anneal", "fold_masks",
                     "adaptive_widths"],
        "export": {"dir": str(out), "formats": ["nested", "sliced"]},
        "seed": 0,
    })
    flexc.compile(spec, quiet=True)
    return out


def _bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors") if f.name != "flexc_widths.safetensors")


def _sorted_widths(state: dict) -> list:
    return [state["widths"][k] for k in sorted(state["widths"], key=int)]


def measure_nested(nested: Path, label: str, args, manifest_of, rows: list, processor: bool = False,
                   adaptive: bool = False, overrides: dict | None = None):
    """Every budget of a nested artifact on one engine, switched live (``adaptive``: then each budget
    below 1 on its token-adaptive policy, where the artifact has one); returns (engine, active params
    per budget, switch seconds, start seconds)."""
    from flexc.serving import get_budget, set_budget
    from flexc.serving.requests import PROCESSOR

    llm, started = start(str(nested), **({"logits_processors": [PROCESSOR]} if processor else {}),
                         **({"hf_overrides": overrides} if overrides else {}))
    manifest, config = manifest_of(nested)
    switches, active = [], {}
    budgets = get_budget(llm)["budgets"]
    as_routed = routed_keeps(nested)
    for keep in budgets:
        state = set_budget(llm, keep)
        switches.append(state["total_s"])
        active[keep] = active_params(manifest, config, _sorted_widths(state))
        rows.append({"engine": label, "keep": keep, **measure(llm, args), "active_params": active[keep],
                     **({"active_keep_routed": as_routed[keep],
                         "routed_active_params": routed_active_params(manifest, config, as_routed[keep])}
                        if keep in as_routed else {}),
                     "weights_bytes": _bytes(nested), "packed_bytes": state["packed_bytes"],
                     "experts_kernel": state["experts_kernel"], "switch_s": state["switch_s"], "start_s": started})
    if adaptive and get_budget(llm)["adaptive_policy"]:
        for keep in (b for b in budgets if b < 1.0):
            state = set_budget(llm, keep, adaptive=True)
            rows.append({"engine": f"{label}, adaptive", "keep": keep, **measure(llm, args),
                         "active_params": active[keep], "weights_bytes": _bytes(nested),
                         "packed_bytes": state["packed_bytes"], "pieces_bytes": state["pieces_bytes"],
                         "experts_kernel": state["experts_kernel"], "start_s": started})
    return llm, active, switches, started


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("prefill_tok_s", "prefill"), ("decode_b1_tok_s", "decode b1"), ("decode_b8_tok_s", "decode b8")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    engines = [e for e in dict.fromkeys(r["engine"] for r in rows) if e != "stock vLLM"]
    for ax, (key, title) in zip(axes, keys):
        for engine in engines:
            mine = sorted((r for r in rows if r["engine"] == engine), key=lambda r: r["keep"])
            ax.plot([r["keep"] for r in mine], [r["ratios"][key] for r in mine], marker="o", label=engine)
        ideal = sorted((r for r in rows if r["engine"] != "stock vLLM"), key=lambda r: r["keep"])
        ax.plot([r["keep"] for r in ideal], [r["ideal"] for r in ideal], ":", color="grey", label="ideal")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("keep (routed-expert parameters)")
    axes[0].set_ylabel("throughput / stock vLLM")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", help="zoo model (default: small)")
    parser.add_argument("--run", help="an existing compile's output directory (nested/, sliced/) instead of "
                                      "compiling the zoo model with the defaults")
    parser.add_argument("--stock", help="with --run: the unpruned checkpoint stock vLLM serves (default: the zoo model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-len", type=int, default=256)
    parser.add_argument("--decode-len", type=int, default=64)
    parser.add_argument("--skip", default="", help="comma-separated engines to leave out: uniform, learned, sliced, "
                        "policy-mix (the learned artifact's requests choosing the adaptive policy or the static table)")
    parser.add_argument("--flexc-op", action="store_true", help="also the learned nested artifact with its engine "
                        "budget on flexc's op instead of vLLM's CPU kernel (flexc_experts_kernel: flexc)")
    parser.add_argument("--compiled", action="store_true", help="every engine, stock vLLM's too, in vLLM's default "
                        "mode (torch.compile; start-up takes longer) instead of eager")
    parser.add_argument("--sliced-from", action="append", default=[], metavar="RUN",
                        help="also another compile's sliced checkpoints, in the same run (e.g. the same tables "
                             "quantized); repeatable")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="every engine's dtype (a quantized sliced checkpoint's experts run in int4 on vLLM's "
                             "kernel whatever it is)")
    parser.add_argument("--out", default=str(RESULTS / "serve.json"))
    args = parser.parse_args()
    EAGER[0] = not args.compiled
    DTYPE[0] = args.dtype
    # OMP_NUM_THREADS is left to the caller: unset, vLLM gives each engine's worker as many torch threads as
    # the cores it binds it to (one of this machine's two; more threads there spin against each other).
    skip = set(filter(None, args.skip.split(",")))

    import flexc.zoo

    work = Path(tempfile.mkdtemp(prefix="flexc-serve-bench-"))
    source = Path(args.stock) if args.stock else flexc.zoo.resolve(args.model)
    run = Path(args.run) if args.run else None
    if run is None and not {"learned", "sliced"} <= skip:
        begin = time.perf_counter()
        run = compiled_run(args.model, work / "run")
        print(f"compiled {args.model} with the defaults in {time.perf_counter() - begin:.0f} s → {run}")

    def manifest_of(nested: Path):
        return (json.loads((nested / "flexc_manifest.json").read_text()),
                json.loads((nested / "config.json").read_text()))

    rows: list[dict] = []
    llm, stock_start = start(str(source))
    stock = {"engine": "stock vLLM", "keep": 1.0, **measure(llm, args), "weights_bytes": _bytes(source),
             "start_s": stock_start}
    rows.append(stock)
    STOCK[0] = llm

    mixed_row, policy_mix, switches, full_active, flexc_start = None, None, [], None, None
    if "uniform" not in skip:
        from flexc.serving import get_budget

        mean_keep = statistics.mean(MIXED)
        uniform_artifact(args.model, work / "uniform", keeps=tuple(sorted({*KEEPS, mean_keep}, reverse=True)))
        llm, active, switches, flexc_start = measure_nested(work / "uniform", "flexc nested, uniform", args,
                                                            manifest_of, rows, processor=True)
        full_active = active[1.0]
        mixed = [b for _ in range(2) for b in MIXED]
        mixed_row = {"engine": "flexc mixed", "budgets": mixed, **measure_mixed(llm, args, mixed, mean_keep),
                     "ideal": full_active / statistics.mean(active[b] for b in mixed), "mean_keep": mean_keep}
        mixed_row["pieces_bytes"] = get_budget(llm)["pieces_bytes"]
        shutdown(llm)
    learned_active = {}
    if "learned" not in skip:
        llm, learned_active, more, flexc_start = measure_nested(run / "nested", "flexc nested, learned", args,
                                                                manifest_of, rows, adaptive=True)
        switches += more
        full_active = full_active or learned_active[1.0]
        shutdown(llm)
        if "policy-mix" not in skip and (run / "nested" / "flexc_adaptive.json").is_file():
            from flexc.serving.requests import PROCESSOR

            llm, _ = start(str(run / "nested"), logits_processors=[PROCESSOR])
            policy_mix = {"engine": "flexc nested, learned, per request", **measure_policy_mix(llm, args, 0.5)}
            shutdown(llm)
        if args.flexc_op:
            llm, _, _, _ = measure_nested(run / "nested", "flexc nested, learned, flexc op", args, manifest_of, rows,
                                          overrides={"flexc_experts_kernel": "flexc"})
            shutdown(llm)
    if "sliced" not in skip:
        from flexc.serving import get_budget

        for sliced_run, entry in [(r, e) for r in [run, *map(Path, args.sliced_from)]
                                  for e in json.loads((r / "sliced" / "flexc_manifest.json").read_text())["budgets"]]:
            directory = sliced_run / "sliced" / entry["dir"]
            llm, started = start(str(directory))
            state = get_budget(llm)
            manifest, config = manifest_of(sliced_run / "nested")
            full_active = full_active or routed_active_params(manifest, config, 1.0)  # the unpruned model's
            quantization = json.loads((directory / "config.json").read_text()).get("flexc_sliced", {}).get(
                "quantization")
            engine = "flexc sliced" + (f" {quantization['scheme']} g{quantization['group_size']} "
                                       f"({state['experts_kernel'][0]})" if quantization else "")
            rows.append({"engine": engine, "keep": entry["keep"], **measure(llm, args),
                         "active_params": active_params(manifest, config, _sorted_widths(state)),
                         "buckets": {k: len(v) for k, v in state["buckets"].items()},
                         "experts_kernel": state["experts_kernel"], "weights_bytes": _bytes(directory),
                         "start_s": started})
            shutdown(llm)

    shutdown(STOCK[0])
    keys = ["prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s"]
    print(f"{'engine':<44} {'keep':>5} {'prefill tok/s':>14} {'b1 tok/s':>9} {'b1 ms':>7} {'b8 tok/s':>9} "
          f"{'ratios vs stock (prefill/b1/b8)':>32} {'ideal':>6} {'routed':>6} {'MB':>6} {'+packed':>7}")
    for r in rows:
        r["ratios"] = r.get("paired") or {k: r[k] / stock[k] for k in keys}
        r["ideal"] = full_active / r["active_params"] if "active_params" in r and full_active else 1.0
        if "routed_active_params" in r and full_active:  # the ideal as the tokens route (learned tables)
            r["ideal_routed"] = full_active / r["routed_active_params"]
        ratios = " / ".join(f"{r['ratios'][k]:.2f}" for k in keys)
        print(f"{r['engine']:<44} {r['keep']:>5.2f} {r['prefill_tok_s']:>14.0f} {r['decode_b1_tok_s']:>9.1f} "
              f"{r['decode_b1_ms_per_step']:>7.1f} {r['decode_b8_tok_s']:>9.1f} {ratios:>32} {r['ideal']:>6.2f} "
              f"{r['ideal_routed'] if 'ideal_routed' in r else float('nan'):>6.2f} "
              f"{r['weights_bytes'] / 1e6:>6.1f} {r.get('packed_bytes', 0) / 1e6:>7.1f}")
    if mixed_row is not None:
        print(f"{'flexc mixed':<34} {'/'.join(f'{b:g}' for b in mixed_row['budgets'][:4])} per request: decode b8 "
              f"{mixed_row['decode_b8_tok_s']:.1f} tok/s ({mixed_row['decode_b8_ms_per_step']:.1f} ms a step), "
              f"{mixed_row['ratio_b8']:.2f} vs stock, ideal {mixed_row['ideal']:.2f}; "
              f"{mixed_row['vs_one_budget']:.2f} of one batch at their mean keep {mixed_row['mean_keep']:g}; "
              f"experts in pieces {mixed_row['pieces_bytes'] / 1e6:.1f} MB")
    if policy_mix is not None:
        print(f"{'flexc policy per request':<34} keep {policy_mix['keep']:g}, decode b8: static "
              f"{policy_mix['static_b8_tok_s']:.1f} tok/s, adaptive {policy_mix['adaptive_b8_tok_s']:.1f} "
              f"({policy_mix['adaptive_vs_static']:.2f} of static), half and half in one batch "
              f"{policy_mix['mixed_b8_tok_s']:.1f} ({policy_mix['mixed_vs_static']:.2f} of static)")
    switch = statistics.median(switches) if switches else None
    if switch is not None:
        print(f"budget switch (set_budget round trip, median of {len(switches)}): {switch * 1e3:.1f} ms; "
              f"engine start: flexc {flexc_start:.1f} s, stock {stock_start:.1f} s")
    result = {"model": args.model, "run": str(run) if run else None, "repeats": args.repeats,
              "prefill_len": args.prefill_len, "decode_len": args.decode_len, "rows": rows, "mixed": mixed_row,
              "policy_mix": policy_mix,
              "switch_s": switch, "restart_s": flexc_start, "prefix_caching": False, "compiled": args.compiled,
              "dtype": args.dtype,
              "threads": os.environ.get("OMP_NUM_THREADS")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")


if __name__ == "__main__":
    main()
