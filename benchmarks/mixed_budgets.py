"""One MoE layer on CPU, a batch whose tokens carry different budgets: one op call per budget
(each budget's tokens at its per-expert widths, how per-request budgets ran before) against one
call with per-pair widths (``widths [T, k]``), and beside them a batch at one budget.

Budgets 1 / 0.75 / 0.5 / 0.25 with uniform tables (every expert at ``keep * I``), an equal share
of the batch each; random routing, seeded. Medians of interleaved rounds in one process, so the
ratios are side by side; wall clock on ``--threads`` threads.

    python benchmarks/mixed_budgets.py                      # the zoo `small` recipe's expert shapes
    python benchmarks/mixed_budgets.py --experts 64 --hidden 1024 --intermediate 768 --top-k 8 --tokens 4,8,32,128 \
        --rounds 40 --out benchmarks/results/mixed_budgets_large.json

Prints a table and writes ``benchmarks/results/mixed_budgets.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, print_table, write_json  # noqa: E402

from flexc.ir.grouped import moe_experts_cpu  # noqa: E402
from flexc.ir.layout import ExpertLayout, ExpertWeights  # noqa: E402
from flexc.ir.op import run_experts  # noqa: E402

KEEPS = (1.0, 0.75, 0.5, 0.25)


def timed(fns: dict, rounds: int) -> dict[str, float | None]:
    """Median milliseconds of each function, the functions interleaved round by round; None for one
    that returns None (a forced strategy the grouped path declines: the op would run the reference)."""
    runs = {name: fn for name, fn in fns.items() if fn() is not None}
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(times[name]) * 1e3 if name in times else None for name in fns}


def layer_arguments(parser: argparse.ArgumentParser, tokens: str) -> None:
    """A one-layer CPU timing's options: its shape (zoo `small`'s by default), batch sizes, rounds, threads."""
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--tokens", default=tokens, help="batch sizes")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)


def random_layer(args) -> tuple[ExpertWeights, torch.Generator]:
    """Seeded random expert weights of ``args``' shape (silu, concatenated gate/up), and the generator for the
    rest of the run's random inputs; sets the thread count."""
    torch.set_num_threads(args.threads)
    E, H, I = args.experts, args.hidden, args.intermediate
    g = torch.Generator().manual_seed(0)
    weights = ExpertWeights(torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5,
                            None, None, ExpertLayout("silu", False))
    return weights, g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    layer_arguments(parser, tokens="4,8,32,256")  # multiples of the 4 budgets
    parser.add_argument("--out", type=Path, default=RESULTS / "mixed_budgets.json")
    args = parser.parse_args()
    weights, g = random_layer(args)
    E, H, I, k = args.experts, args.hidden, args.intermediate, args.top_k
    tables = torch.stack([torch.full((E,), int(keep * I), dtype=torch.int32) for keep in KEEPS])
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        h = torch.randn(T, H, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        w = torch.rand(T, k, generator=g)
        budget_of = torch.arange(T) * len(KEEPS) // T  # an equal share of the batch per budget
        groups = [(b, torch.nonzero(budget_of == b).flatten()) for b in range(len(KEEPS))]
        pair_widths = tables[budget_of[:, None], ids]

        def per_budget():
            out = torch.empty_like(h)
            for b, tokens in groups:
                out[tokens] = run_experts(h[tokens], ids[tokens], w[tokens], weights, tables[b])
            return out

        fns = {"per_budget": per_budget, "one_call": lambda: run_experts(h, ids, w, weights, pair_widths),
               "one_call_pad": lambda: moe_experts_cpu(h, ids, w, weights, pair_widths, strategy="pad"),
               "one_call_group": lambda: moe_experts_cpu(h, ids, w, weights, pair_widths, strategy="group")}
        fns.update({f"single_{keep:g}": (lambda t=tables[i]: run_experts(h, ids, w, weights, t))
                    for i, keep in enumerate(KEEPS)})
        torch.testing.assert_close(per_budget(), fns["one_call"](), rtol=1e-5, atol=1e-5)
        ms = timed(fns, args.rounds)
        mean_keep = (ms["single_0.75"] + ms["single_0.5"]) / 2  # ~keep 0.625, the batch's mean
        rows.append({"tokens": T, **{f"{n}_ms": None if v is None else round(v, 4) for n, v in ms.items()},
                     "per_budget_over_one_call": round(ms["per_budget"] / ms["one_call"], 3),
                     "one_call_vs_single_at_mean_keep": round(mean_keep / ms["one_call"], 3)})
    print(f"E={E} H={H} I={I} top-{k}, budgets {'/'.join(f'{x:g}' for x in KEEPS)}, {args.threads} threads, "
          f"median of {args.rounds} interleaved rounds (ms)")
    print_table(rows, ["tokens", "per_budget_ms", "one_call_ms", "one_call_pad_ms", "one_call_group_ms",
                       "single_0.75_ms", "single_0.5_ms", "per_budget_over_one_call",
                       "one_call_vs_single_at_mean_keep"])
    write_json(args.out, {"shape": {"experts": E, "hidden": H, "intermediate": I, "top_k": k},
                          "budgets": list(KEEPS), "threads": args.threads, "rounds": args.rounds, "results": rows})


if __name__ == "__main__":
    main()
