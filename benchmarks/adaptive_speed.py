"""Speed of token-adaptive widths on CPU: one MoE layer with per-pair widths from a routing-weight threshold
between two levels, against the same layer at one static width table of the same mean active keep.

The adaptive case: each pair runs at ``--upper`` x I if its routing weight reaches the threshold, else at
``--lower`` x I, the threshold set so the mean width is ``--keep`` x I (flexc's op with ``widths [T, k]``);
the static case: every expert at ``--keep`` x I (``widths [E]``). Uniform levels, random routing (seeded),
medians of interleaved rounds in one process, so the ratio is side by side.

    python benchmarks/adaptive_speed.py                          # the zoo `small` recipe's expert shapes
    python benchmarks/adaptive_speed.py --experts 64 --hidden 1024 --intermediate 768 --top-k 8 \\
        --out benchmarks/results/adaptive_speed_large.json

Prints a table and writes ``benchmarks/results/adaptive_speed.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, print_table, write_json  # noqa: E402
from mixed_budgets import layer_arguments, random_layer, timed  # noqa: E402

from flexc.ir.op import run_experts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    layer_arguments(parser, tokens="1,4,8,32,256")
    parser.add_argument("--keep", type=float, default=0.5, help="mean active keep of both cases")
    parser.add_argument("--upper", type=float, default=0.75)
    parser.add_argument("--lower", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=RESULTS / "adaptive_speed.json")
    args = parser.parse_args()
    if not args.lower < args.keep < args.upper:
        parser.error("--lower < --keep < --upper")
    weights, g = random_layer(args)
    E, H, I, k = args.experts, args.hidden, args.intermediate, args.top_k
    upper, lower, static = (int(round(x * I)) for x in (args.upper, args.lower, args.keep))
    share = (static - lower) / (upper - lower)  # the fraction of pairs at the upper level
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        h = torch.randn(T, H, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        w = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
        threshold = torch.quantile(w.flatten(), 1 - share) if T * k > 1 else w.flatten()[0]
        pair = torch.where(w >= threshold, upper, lower).to(torch.int32)
        row_static = torch.full((E,), static, dtype=torch.int32)
        fns = {"static": lambda: run_experts(h, ids, w, weights, row_static),
               "adaptive": lambda: run_experts(h, ids, w, weights, torch.where(w >= threshold, upper, lower)
                                               .to(torch.int32))}
        ms = timed(fns, args.rounds)
        rows.append({"tokens": T, "pairs_at_upper": round(float((pair == upper).float().mean()), 3),
                     "static_ms": round(ms["static"], 4), "adaptive_ms": round(ms["adaptive"], 4),
                     "adaptive_vs_static": round(ms["static"] / ms["adaptive"], 3)})
    print(f"E={E} H={H} I={I} top-{k}: adaptive {args.upper:g}/{args.lower:g} of I by routing weight vs static "
          f"{args.keep:g} of I; {args.threads} threads, median of {args.rounds} interleaved rounds (ms); "
          "adaptive_vs_static > 1: adaptive faster")
    print_table(rows, ["tokens", "pairs_at_upper", "static_ms", "adaptive_ms", "adaptive_vs_static"])
    write_json(args.out, {"shape": {"experts": E, "hidden": H, "intermediate": I, "top_k": k},
                          "keep": args.keep, "upper": args.upper, "lower": args.lower, "threads": args.threads,
                          "rounds": args.rounds, "results": rows})


if __name__ == "__main__":
    main()
