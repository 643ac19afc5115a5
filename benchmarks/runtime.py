"""Serving cost on CPU: stock transformers vs the nested runtime vs sliced checkpoints.

For a zoo model, builds a nested artifact and sliced checkpoints (channels ranked by
activation norm, ``uniform`` width tables at the requested budgets: the runtime cost depends
on how many channels are kept, not on which), then measures

- bytes on disk, and memory after loading (each load in its own process): the bytes of the
  model's tensors, and the process's RSS growth (which also counts imports and caches);
- prefill tokens/s (batch × prompt) and decode tokens/s (batch 1 and 8, greedy, KV cache);
  every model lives in one process and the timings are interleaved round by round, so the
  ratios are side by side; medians over rounds;
- the ideal speedup implied by the FLOPs removed (matmul FLOPs per token: attention
  projections, router, kept expert channels × top-k, LM head; attention scores at the mean
  context length);
- budget switch time (``set_budget``) against reloading a sliced checkpoint.

    python benchmarks/runtime.py --model small
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, calibration, context, print_table, write_json  # noqa: E402

log = logging.getLogger("bench")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin"))


# ------------------------------------------------------------------------------ artifacts
def build_artifacts(model_name: str, budgets: list[float], workdir: Path) -> dict:
    """Zoo model → nested artifact + one sliced checkpoint per budget (cached in ``workdir``)."""
    import flexc.zoo
    from flexc.export.nested import write_nested
    from flexc.export.sliced import write_sliced
    from flexc.ir.tables import budget_key
    from flexc.ir import lower
    from flexc.passes import resolve_pass
    from flexc.passes.manager import run_pass
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = flexc.zoo.resolve(model_name)
    done = workdir / "done.json"
    if done.is_file() and json.loads(done.read_text()).get("budgets") == budgets:
        return {"base": base, "nested": workdir / "nested", "sliced": workdir / "sliced"}
    shutil.rmtree(workdir, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    graph = lower(model)
    ctx = context(workdir / "passes", tokenizer, calibration(tokenizer, 16), budgets=[b for b in budgets if b < 1])
    run_pass(resolve_pass("rank_channels")({"score": "activation", "plot": False}), graph, ctx)
    run_pass(resolve_pass("uniform")(), graph, ctx)
    run_pass(resolve_pass("fold_masks")(), graph, ctx)
    tables = ctx.state.width_tables
    write_nested(workdir / "nested", model, graph.groups, tables, tokenizer=tokenizer)
    for b in budgets:
        write_sliced(workdir / "sliced" / budget_key(b), model, graph.groups, tables.table(b), budget=b,
                     tokenizer=tokenizer)
    done.write_text(json.dumps({"budgets": budgets}))
    return {"base": base, "nested": workdir / "nested", "sliced": workdir / "sliced"}


def load_variant(kind: str, paths: dict, budget: float):
    from transformers import AutoModelForCausalLM

    import flexc
    from flexc.export.tables import budget_key

    if kind == "stock":
        return AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32).eval()
    if kind == "nested":
        return flexc.load(paths["nested"], budget=budget)
    return flexc.load(paths["sliced"] / budget_key(budget))


# ------------------------------------------------------------------------------ memory
def rss_child(kind: str, paths: dict, budget: float) -> dict:
    def rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    import transformers  # noqa: F401 -- import cost is not the model's

    import flexc  # noqa: F401

    before = rss()
    start = time.perf_counter()
    model = load_variant(kind, paths, budget)
    seconds = time.perf_counter() - start
    import gc

    gc.collect()
    # Bytes of the model's tensors (unique storages: tied weights count once) — what the model
    # holds; the RSS delta adds whatever the load imported or cached, and is noisier.
    storages = {}
    for t in list(model.parameters()) + list(model.buffers()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return {"rss_mb": (rss() - before) / 2**20, "load_s": seconds, "tensor_mb": sum(storages.values()) / 2**20}


def measure_memory(kind: str, paths: dict, budget: float) -> dict:
    args = [sys.executable, __file__, "--child", json.dumps([kind, {k: str(v) for k, v in paths.items()}, budget])]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"memory child {kind} {budget} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ speed
def flops_per_token(config, groups, widths: torch.Tensor, context_len: float) -> float:
    """Matmul FLOPs of one token's forward (2 per multiply-add)."""
    hidden = config.hidden_size
    heads, kv, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    per_layer_attn = hidden * head_dim * (2 * heads + 2 * kv) + 2 * heads * head_dim * context_len
    router = sum(g.num_experts * g.hidden_size for g in groups)
    experts = sum(g.top_k * 3 * g.hidden_size * float(widths[i].float().mean()) for i, g in enumerate(groups))
    lm_head = hidden * config.vocab_size
    return 2 * (config.num_hidden_layers * per_layer_attn + router + experts + lm_head)


def time_prefill(model, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        return time.perf_counter() - start


def time_decode(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds per generated token step (prompt prefill subtracted)."""
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0)
        total = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        prefill = time.perf_counter() - start
    return max(total - prefill, 1e-9) / (new_tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--budgets", default="1.0,0.75,0.5,0.25")
    parser.add_argument("--prefill", default="8x256", help="batch x prompt length")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/flexc-bench-runtime"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        kind, paths, budget = json.loads(args.child)
        print(json.dumps(rss_child(kind, {k: Path(v) for k, v in paths.items()}, budget)))
        return

    budgets = [float(b) for b in args.budgets.split(",")]
    paths = build_artifacts(args.model, budgets, args.workdir / args.model)
    from flexc.export.tables import budget_key

    # ---- disk and memory
    disk = {"stock": _dir_bytes(paths["base"]), "nested": _dir_bytes(paths["nested"])}
    memory = {"stock": measure_memory("stock", paths, 1.0), "nested": measure_memory("nested", paths, 1.0)}
    for b in budgets:
        disk[f"sliced@{b:g}"] = _dir_bytes(paths["sliced"] / budget_key(b))
        memory[f"sliced@{b:g}"] = measure_memory("sliced", paths, b)

    # ---- speed, interleaved
    stock = load_variant("stock", paths, 1.0)
    nested = load_variant("nested", paths, 1.0)
    sliced = {b: load_variant("sliced", paths, b) for b in budgets}
    batch, seq = (int(x) for x in args.prefill.split("x"))
    vocab = stock.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    prompt = {n: torch.randint(3, vocab, (n, 16), generator=gen) for n in (1, 8)}
    variants = [("stock", 1.0, stock)] + [("nested", b, nested) for b in budgets] + \
               [("sliced", b, m) for b, m in sliced.items()]
    times: dict[tuple, dict[str, list[float]]] = {(k, b): {"prefill": [], "decode1": [], "decode8": []}
                                                 for k, b, _ in variants}
    for r in range(args.rounds + 1):  # round 0 warms up
        for kind, b, model in variants:
            if kind == "nested":
                model.set_budget(b)
            t = times[(kind, b)]
            p, d1, d8 = (time_prefill(model, prefill_ids), time_decode(model, prompt[1], args.new_tokens),
                         time_decode(model, prompt[8], args.new_tokens))
            if r:
                t["prefill"].append(p)
                t["decode1"].append(d1)
                t["decode8"].append(d8)
        print(f"round {r}/{args.rounds} done", file=sys.stderr)

    groups = nested.flexc.groups
    full_flops = flops_per_token(stock.config, groups, nested.flexc.tables.table(1.0), seq / 2)
    stock_prefill = statistics.median(times[("stock", 1.0)]["prefill"])
    rows = []
    for kind, b, _ in variants:
        t = {k: statistics.median(v) for k, v in times[(kind, b)].items()}
        widths = nested.flexc.tables.table(b)
        ideal = full_flops / flops_per_token(stock.config, groups, widths, seq / 2)
        speedup = stock_prefill / t["prefill"]
        key = "stock" if kind == "stock" else ("nested" if kind == "nested" else f"sliced@{b:g}")
        mem_key = key if kind != "nested" else "nested"
        rows.append({
            "model": kind, "keep": b,
            "disk_mb": disk[key if kind != "nested" else "nested"] / 2**20,
            "tensor_mb": memory[mem_key]["tensor_mb"],
            "rss_mb": memory[mem_key]["rss_mb"],
            "prefill_tok_s": batch * seq / t["prefill"],
            "decode1_tok_s": 1 / t["decode1"],
            "decode8_tok_s": 8 / t["decode8"],
            "prefill_speedup": speedup,
            "ideal_speedup": ideal,
            "of_ideal": speedup / ideal,  # the target: >= 0.8 at keep 0.5
            "gain_of_ideal": (speedup - 1) / (ideal - 1) if ideal > 1.0001 else None,  # stricter view
        })

    # ---- switch vs reload
    switch = []
    for _ in range(200):
        for b in budgets:
            start = time.perf_counter()
            nested.set_budget(b)
            switch.append(time.perf_counter() - start)
    reload = [measure_memory("sliced", paths, budgets[len(budgets) // 2])["load_s"] for _ in range(2)]

    print()
    print_table(rows, ["model", "keep", "disk_mb", "tensor_mb", "rss_mb", "prefill_tok_s", "decode1_tok_s", "decode8_tok_s",
                       "prefill_speedup", "ideal_speedup", "of_ideal", "gain_of_ideal"])
    nested_full = next(r for r in rows if r["model"] == "nested" and r["keep"] == 1.0)
    stock_row = rows[0]
    summary = {
        "nested_keep1_vs_stock_prefill": nested_full["prefill_tok_s"] / stock_row["prefill_tok_s"],
        "nested_keep1_vs_stock_decode1": nested_full["decode1_tok_s"] / stock_row["decode1_tok_s"],
        "nested_keep1_vs_stock_decode8": nested_full["decode8_tok_s"] / stock_row["decode8_tok_s"],
        "switch_ms_median": statistics.median(switch) * 1e3,
        "switch_ms_max": max(switch) * 1e3,
        "sliced_reload_s": statistics.median(reload),
    }
    half = [r for r in rows if r["model"] == "sliced" and r["keep"] == 0.5]
    if half:
        summary["sliced_keep0.5_of_ideal_prefill_speedup"] = half[0]["of_ideal"]
    print()
    for k, v in summary.items():
        print(f"{k:40s} {v:.4g}")
    out = args.out or RESULTS / f"runtime_{args.model}.json"
    write_json(out, {"benchmark": "runtime", "model": args.model, "threads": args.threads,
                     "prefill": args.prefill, "new_tokens": args.new_tokens, "rounds": args.rounds,
                     "targets": {"nested_keep1_vs_stock": ">= 0.9", "sliced_keep0.5_of_ideal": ">= 0.8",
                                 "switch_ms": "< 1"},
                     "rows": rows, "summary": summary})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
