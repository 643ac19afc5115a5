"""Serving speed in vLLM: a flexc nested artifact at keep 1 / 0.75 / 0.5 / 0.25 beside stock vLLM.

One run, one machine: stock vLLM serves the unpruned checkpoint (vLLM's own fused-MoE layer);
one flexc engine serves the nested artifact and is switched live through every budget. Per
engine/budget: prefill throughput (8 prompts of ``--prefill-len`` tokens, one output token),
decode throughput and per-token latency at batch 1 and 8, each the median of ``--repeats`` runs;
the ratio to stock and the *ideal* ratio beside it (active parameters per token, unpruned over
pruned: the FLOPs and, at batch 1, the bytes a token touches). Then a *mixed* batch: 8 requests
decoding together, each naming its own budget (1, 0.75, 0.5, 0.25, twice; per-request budgets,
docs/serving.md), its ideal the mean active parameters of those requests. Then the switch time
against an engine restart. Prefix caching is off in every engine (the repeats send the same
prompts: with it on, every repeat after the first would prefill from the cache).

The artifact is the zoo model's own weights with *uniform* widths (every expert keeps the same
prefix), so that each keep ratio is exact and the ideal is a plain formula; a compiled artifact
(``--artifact runs/x/nested``) can be measured instead, at its own budgets.

    python benchmarks/serve.py                       # zoo `small`, CPU, ~5 minutes on 2 cores
    python benchmarks/serve.py --model tiny --repeats 1

Needs vLLM (the ``serve-cpu`` extra, docs/serving.md). Prints a table and writes
``benchmarks/results/serve.json``.
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


DECODE_PROMPTS = [[200 + (i * 11 + j) % 1500 for j in range(16)] for i in range(8)]


def _timed(llm, prompts, max_tokens, budgets=None) -> float:
    """Seconds to generate ``max_tokens`` for every prompt at once (``budgets``: one per request)."""
    from vllm import SamplingParams

    budgets = budgets or [None] * len(prompts)
    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                             extra_args=None if b is None else {"flexc_budget": b}) for b in budgets]
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start


def measure_mixed(llm, args, budgets: list[float]) -> dict:
    """Decode throughput of 8 requests decoding together, request i at ``budgets[i]``."""
    seconds = statistics.median(_timed(llm, DECODE_PROMPTS, args.decode_len, budgets) for _ in range(args.repeats))
    return {"decode_b8_tok_s": 8 * args.decode_len / seconds, "decode_b8_ms_per_step": 1e3 * seconds / args.decode_len}


def measure(llm, args) -> dict:
    """Prefill throughput (8 prompts), decode throughput and per-step latency at batch 1 and 8."""
    prefill_prompts = [[100 + (i * 7 + j) % 1500 for j in range(args.prefill_len)] for i in range(8)]
    _timed(llm, DECODE_PROMPTS[:1], 4)  # warm-up
    out = {}
    prefill = statistics.median(_timed(llm, prefill_prompts, 1) for _ in range(args.repeats))
    out["prefill_tok_s"] = 8 * args.prefill_len / prefill
    for batch in (1, 8):
        seconds = statistics.median(_timed(llm, DECODE_PROMPTS[:batch], args.decode_len)
                                    for _ in range(args.repeats))
        out[f"decode_b{batch}_tok_s"] = batch * args.decode_len / seconds
        out[f"decode_b{batch}_ms_per_step"] = 1e3 * seconds / args.decode_len
    return out


def start(model: str, **kwargs):
    from vllm import LLM

    begin = time.perf_counter()
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
              kv_cache_memory_bytes=256 << 20, enable_prefix_caching=False, **kwargs)
    return llm, time.perf_counter() - begin


def shutdown(llm) -> None:
    import gc

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()
    del llm
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", help="zoo model (default: small)")
    parser.add_argument("--artifact", help="a nested artifact to measure instead (its own budgets)")
    parser.add_argument("--stock", help="with --artifact: the unpruned checkpoint stock vLLM serves beside it")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-len", type=int, default=256)
    parser.add_argument("--decode-len", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS / "serve.json"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")

    from flexc.serving import get_budget, set_budget

    work = Path(tempfile.mkdtemp(prefix="flexc-serve-bench-"))
    if args.artifact:
        nested = Path(args.artifact)
        manifest = json.loads((nested / "flexc_manifest.json").read_text())
        source = Path(args.stock) if args.stock else None
    else:
        nested = work / "nested"
        source = uniform_artifact(args.model, nested)
        manifest = json.loads((nested / "flexc_manifest.json").read_text())

    rows = []
    stock = None
    if source is not None:
        llm, stock_start = start(str(source))
        stock = measure(llm, args)
        rows.append({"engine": "stock vLLM", "keep": 1.0, **stock, "ideal": 1.0, "start_s": stock_start})
        shutdown(llm)

    from flexc.serving.requests import PROCESSOR

    llm, flexc_start = start(str(nested), logits_processors=[PROCESSOR])  # per-request budgets too
    full_widths = get_budget(llm)["widths"]
    config = json.loads((nested / "config.json").read_text())
    full_active = active_params(manifest, config, [full_widths[k] for k in sorted(full_widths, key=int)])
    switches, active = [], {}
    for keep in get_budget(llm)["budgets"]:
        state = set_budget(llm, keep)
        switches.append(state["total_s"])
        widths = [state["widths"][k] for k in sorted(state["widths"], key=int)]
        active[keep] = active_params(manifest, config, widths)
        figures = measure(llm, args)
        rows.append({"engine": "flexc", "keep": keep, **figures, "ideal": full_active / active[keep],
                     "start_s": flexc_start})
    mixed = [b for _ in range(2) for b in sorted(active, reverse=True)][:8]
    mixed_row = {"engine": "flexc mixed", "budgets": mixed, **measure_mixed(llm, args, mixed),
                 "ideal": full_active / statistics.mean(active[b] for b in mixed)}
    shutdown(llm)

    base = stock or rows[0]
    keys = ["prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s"]
    print(f"{'engine':<11} {'keep':>5} {'prefill tok/s':>14} {'b1 tok/s':>9} {'b1 ms':>7} {'b8 tok/s':>9} "
          f"{'ratios vs stock (prefill/b1/b8)':>32} {'ideal':>6}")
    for r in rows:
        r["ratios"] = {k: r[k] / base[k] for k in keys}
        ratios = " / ".join(f"{r['ratios'][k]:.2f}" for k in keys)
        print(f"{r['engine']:<11} {r['keep']:>5.2f} {r['prefill_tok_s']:>14.0f} {r['decode_b1_tok_s']:>9.1f} "
              f"{r['decode_b1_ms_per_step']:>7.1f} {r['decode_b8_tok_s']:>9.1f} {ratios:>32} {r['ideal']:>6.2f}")
    b8 = base["decode_b8_tok_s"]
    mixed_row["ratio_b8"] = mixed_row["decode_b8_tok_s"] / b8
    print(f"{'flexc mixed':<11} {'/'.join(f'{b:g}' for b in mixed[:4])} per request: decode b8 "
          f"{mixed_row['decode_b8_tok_s']:.1f} tok/s ({mixed_row['decode_b8_ms_per_step']:.1f} ms a step), "
          f"{mixed_row['ratio_b8']:.2f} vs stock, ideal {mixed_row['ideal']:.2f}")
    switch = statistics.median(switches)
    print(f"budget switch (set_budget round trip, median of {len(switches)}): {switch * 1e3:.1f} ms; "
          f"engine start: flexc {flexc_start:.1f} s" + (f", stock {rows[0]['start_s']:.1f} s" if stock else ""))
    result = {"model": args.artifact or args.model, "repeats": args.repeats, "prefill_len": args.prefill_len,
              "decode_len": args.decode_len, "rows": rows, "mixed": mixed_row, "switch_s": switch,
              "restart_s": flexc_start, "prefix_caching": False,
              "threads": os.environ.get("OMP_NUM_THREADS")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
