"""One MoE layer on vLLM's CPU experts kernel, a batch whose tokens carry different budgets.

What the mixed per-request batch of `benchmarks/serve.py` costs in its experts alone. The batch's
tokens are split equally among budgets 1 / 0.75 / 0.5 / 0.25 (uniform tables); each row runs them:

- **pieces**: one call, each routed pair as its expert's 32-channel pieces below its width
  (:class:`flexc.serving.packed.PackedPieces`, what the plugin runs; one copy of the experts);
- **per budget**: one call per budget, each on its own packed copy of that budget's kept prefixes
  (:class:`flexc.serving.packed.PackedLayer`; 2.5 copies of the experts);
- **flexc op**: flexc's op on the nested weights with per-pair widths (``flexc_experts_kernel: flexc``);
- **one budget at the mean keep** (0.625): the same tokens at one budget, on its packed copy, what the
  mixed batch is judged against.

Random weights and routing, seeded; medians of interleaved rounds in one process, one thread (as vLLM
binds its CPU engine here). Each call follows the other rows' calls, whose weights have passed
through the cache since, as in an engine whose layers' weights do not fit in it: the figures are
for weights read from memory (with the flexc op row left out, the pieces ran at 0.89 of the one
budget at 8 tokens instead of 0.50, timed by hand). Runs in vLLM's environment:

    python benchmarks/serve_pieces.py                      # E=16, H=I=256, top-4 (zoo `small`'s shape)
    python benchmarks/serve_pieces.py --hidden 1024 --intermediate 768 --out benchmarks/results/serve_pieces_h1024.json

Prints microseconds per call and each row's time over the one-budget batch's, and writes
``benchmarks/results/serve_pieces.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, print_table, write_json  # noqa: E402
from mixed_budgets import layer_arguments, random_layer  # noqa: E402

KEEPS = (1.0, 0.75, 0.5, 0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    layer_arguments(parser, tokens="1,4,8,32,128,512")
    parser.set_defaults(rounds=100, threads=1)  # one thread: as vLLM binds its CPU engine here
    parser.add_argument("--out", default=str(RESULTS / "serve_pieces.json"))
    args = parser.parse_args()

    import torch

    from flexc.ir.op import run_experts
    from flexc.serving.packed import PackedLayer, PackedPieces, cpu_kernel_isa

    nested, gen = random_layer(args)
    e, h, i, k = args.experts, args.hidden, args.intermediate, args.top_k
    gate_up, down = nested.gate_up, nested.down
    isa = cpu_kernel_isa(torch.float32, h, "silu", torch.device("cpu"))
    if isa is None:
        raise SystemExit("vLLM's CPU experts kernel is not available here: run this in vLLM's environment")
    rows = [[int(keep * i)] * e for keep in KEEPS]
    mean = int(statistics.mean(KEEPS) * i)
    pieces = PackedPieces(gate_up, down, rows, isa, "silu")
    per_budget = [PackedLayer(gate_up, down, row, k, isa, "silu") for row in rows]
    one = PackedLayer(gate_up, down, [mean] * e, k, isa, "silu")
    table = torch.tensor(rows, dtype=torch.int32)

    results = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, h, generator=gen)
        weights, ids = torch.topk(torch.softmax(torch.randn(tokens, e, generator=gen), dim=-1), k)
        budget = torch.arange(tokens) * len(KEEPS) // tokens  # equal shares, in order
        widths = table[budget[:, None], ids]
        groups = [torch.nonzero(budget == b).flatten() for b in range(len(KEEPS))]

        def split() -> torch.Tensor:
            out = torch.empty_like(x)
            for b, index in enumerate(groups):
                if len(index):
                    out[index] = per_budget[b](x[index], ids[index], weights[index])
            return out

        fns = {"pieces": lambda: pieces(x, ids, weights, widths), "per budget": split,
               "flexc op": lambda: run_experts(x, ids, weights, nested, widths),
               "one budget": lambda: one(x, ids, weights)}
        expected = run_experts(x, ids, weights, nested, widths)
        for name in ("pieces", "per budget"):
            torch.testing.assert_close(fns[name](), expected, rtol=1e-4, atol=1e-5)
        times = {name: [] for name in fns}
        for _ in range(args.rounds if tokens <= 64 else max(5, args.rounds // 10)):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        us = {name: statistics.median(t) * 1e6 for name, t in times.items()}
        results.append({"tokens": tokens, "us": us, "vs_one_budget": {n: us["one budget"] / us[n] for n in us}})

    print(f"one layer, E={e} H={h} I={i} top-{k}, budgets {'/'.join(f'{b:g}' for b in KEEPS)} mixed equally; "
          f"µs per call (one budget's time over it: >1 faster)")
    names = list(results[0]["us"])
    print_table([{"tokens": r["tokens"], **{n: f"{r['us'][n]:.0f} ({r['vs_one_budget'][n]:.2f})" for n in names}}
                 for r in results], ["tokens", *names])
    write_json(Path(args.out), {"experts": e, "hidden": h, "intermediate": i, "top_k": k, "keeps": KEEPS,
                          "pieces_bytes": pieces.nbytes(), "per_budget_bytes": sum(p.nbytes() for p in per_budget),
                          "rows": results})


if __name__ == "__main__":
    main()
