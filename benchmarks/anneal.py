"""Learned nested widths vs uniform widths, and what anneal costs (zoo model, CPU).

Ranks channels (Taylor), inserts action gates, anneals once for every budget, then compares
held-out perplexity of each exported width table with uniform widths (the same keep ratio in
every expert, on the same ranked channels). Also reports anneal's wall time, steps per second
and peak memory.

    python benchmarks/anneal.py --model small --out benchmarks/results/anneal_small.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from flexc.passes import resolve_pass  # noqa: E402
from flexc.passes.width_tables import expert_weights, keep_ratio  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--budgets", default="0.75,0.5,0.35")
    parser.add_argument("--samples", type=int, default=128, help="calibration sequences")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--lambda-end", type=float, default=0.5)
    parser.add_argument("--quality", default="distill", choices=["distill", "next_token"])
    parser.add_argument("--eval-tokens", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    budgets = [float(b) for b in args.budgets.split(",")]

    setup = common.gated_setup(args.model, args.samples, budgets, prefix="flexc-anneal-bench-")
    model, tokenizer, seq_len, graph, ctx, work = (setup.model, setup.tokenizer, setup.seq_len, setup.graph,
                                                   setup.ctx, setup.work)
    rss_before = common.peak_rss_mb()
    start = time.perf_counter()
    anneal_opts = {"steps": args.steps, "lr": args.lr, "quality": args.quality,
                   "lambda": {"start": 0.0, "end": args.lambda_end}}
    resolve_pass("anneal")(anneal_opts)(graph, ctx)
    seconds = time.perf_counter() - start
    history = json.loads((work / "anneal_history.json").read_text())
    report = json.loads((work / "width_tables.json").read_text())

    def ppl():
        return common.heldout_ppl(model, tokenizer, seq_len, args.eval_tokens)

    full = torch.tensor([g.intermediate_size for g in graph.groups])
    weights = expert_weights(graph.groups, "params")
    graph.set_widths(None)
    rows = [{"keep_target": 1.0, "method": "unpruned", "keep": 1.0, "ppl": ppl()}]
    for b, table, info in zip(budgets, ctx.state["width_tables"], report["budgets"]):
        graph.set_widths(table)
        rows.append({"keep_target": b, "method": "learned", "keep": keep_ratio(table, full, weights), "ppl": ppl(),
                     "how": info["how"]})
        uniform = common.uniform_table(graph, b)
        graph.set_widths(uniform)
        rows.append({"keep_target": b, "method": "uniform", "keep": keep_ratio(uniform, full, weights), "ppl": ppl()})
    graph.set_widths(None)
    print(f"\nHeld-out perplexity, {args.model} zoo model: learned nested widths vs uniform widths")
    common.print_table(rows, ["keep_target", "method", "keep", "ppl", "how"])
    cost = {"seconds": seconds, "steps": len(history), "steps_per_second": len(history) / seconds,
            "weights_mb": common.weight_mb(model), "rss_before_anneal_mb": rss_before,
            "peak_rss_mb": common.peak_rss_mb(), "calibration_samples": args.samples, "seq_len": seq_len}
    print("\nanneal cost")
    common.print_table([cost], list(cost))
    out = args.out or common.RESULTS / f"anneal_{args.model}.json"
    common.write_json(out, {"model": args.model, "options": anneal_opts, "eval_tokens": args.eval_tokens,
                            "results": rows, "cost": cost, "tables": report, "artifacts": str(work)})


if __name__ == "__main__":
    main()
