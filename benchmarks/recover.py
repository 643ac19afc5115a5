"""One LoRA recovery at a mid budget, transferred to every budget (zoo model, CPU).

Ranks channels (Taylor), inserts action gates and anneals once for every budget; then reports
held-out perplexity of each exported width table

- before recovery,
- after one recovery at ``--keep`` (default 0.6: 40% of routed-expert parameters pruned),
- and, as the ablation, after a separate recovery at that budget (each from the same
  pre-recovery weights),

plus the full-width model before and after the single recovery, and the cost of a recovery.

    python benchmarks/recover.py --model small --out benchmarks/results/recover_small.json
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
    parser.add_argument("--budgets", default="0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2")
    parser.add_argument("--keep", type=float, default=0.6, help="budget of the single recovery")
    parser.add_argument("--samples", type=int, default=128, help="calibration sequences (anneal and recovery)")
    parser.add_argument("--anneal-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=200, help="recovery steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--loss", default="distill", choices=["distill", "next_token"])
    parser.add_argument("--ablation", default=None,
                        help="budgets that get their own recovery (default: all; 'none' to skip)")
    parser.add_argument("--eval-tokens", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    budgets = sorted({float(b) for b in args.budgets.split(",")} | {args.keep}, reverse=True)

    setup = common.gated_setup(args.model, args.samples, budgets, prefix="flexc-recover-bench-")
    model, tokenizer, seq_len, graph, ctx, work = (setup.model, setup.tokenizer, setup.seq_len, setup.graph,
                                                   setup.ctx, setup.work)
    resolve_pass("anneal")({"steps": args.anneal_steps})(graph, ctx)
    tables = dict(zip(budgets, ctx.state.width_tables.tables))
    pre_recovery = {n: p.detach().clone() for n, p in model.named_parameters()}
    recover_opts = {"steps": args.steps, "lr": args.lr, "rank": args.rank, "loss": args.loss}

    def ppl(table) -> float:
        graph.set_widths(table)
        try:
            return common.heldout_ppl(model, tokenizer, seq_len, args.eval_tokens)
        finally:
            graph.set_widths(None)

    def recover_at(keep: float) -> float:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(pre_recovery[n])
        ctx.workdir = work / f"recover_{keep:g}"
        start = time.perf_counter()
        resolve_pass("recover")({**recover_opts, "keep": keep})(graph, ctx)
        return time.perf_counter() - start

    full = torch.tensor([g.intermediate_size for g in graph.groups])
    weights = expert_weights(graph.groups, "params")
    rows = [{"keep_target": 1.0, "keep": 1.0, "before": ppl(None)}]
    rows += [{"keep_target": b, "keep": keep_ratio(t, full, weights), "before": ppl(t)} for b, t in tables.items()]

    rss_before = common.peak_rss_mb()
    seconds = recover_at(args.keep)
    single = f"after_one_at_{args.keep:g}"
    for row in rows:
        row[single] = ppl(tables.get(row["keep_target"]))
    own = (budgets if args.ablation is None else [] if args.ablation == "none"
           else [float(b) for b in args.ablation.split(",")])
    for row in rows[1:]:
        b = row["keep_target"]
        if b == args.keep:  # its own recovery is the single one
            row["after_own"] = row[single]
        elif b in own:
            recover_at(b)
            row["after_own"] = ppl(tables[b])
    for row in rows:
        row["gain_one"] = row["before"] - row[single]
        if "after_own" in row:
            row["gap_to_own"] = row[single] - row["after_own"]

    columns = ["keep_target", "keep", "before", single, "after_own", "gain_one", "gap_to_own"]
    print(f"\nHeld-out perplexity, {args.model} zoo model: one recovery at keep {args.keep:g} vs per-budget recovery")
    common.print_table(rows, columns)
    cost = {"seconds": seconds, "steps": args.steps, "steps_per_second": args.steps / seconds,
            "weights_mb": common.weight_mb(model), "rss_before_recover_mb": rss_before,
            "peak_rss_mb": common.peak_rss_mb(), "calibration_samples": args.samples, "seq_len": seq_len}
    print("\nrecovery cost (one run)")
    common.print_table([cost], list(cost))
    report = json.loads((work / f"recover_{args.keep:g}" / "recover.json").read_text())
    out = args.out or common.RESULTS / f"recover_{args.model}.json"
    common.write_json(out, {"model": args.model, "keep": args.keep, "anneal_steps": args.anneal_steps,
                            "options": recover_opts, "eval_tokens": args.eval_tokens, "results": rows,
                            "cost": cost, "single_recovery": report, "artifacts": str(work)})


if __name__ == "__main__":
    main()
