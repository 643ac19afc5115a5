"""One MoE layer's experts on CPU: stock transformers vs flexc's op, by width pattern and tokens.

The op dispatches to two grouped GEMMs when every expert hit shares one width (full width,
uniform tables) and to the per-expert reference loop otherwise (a learned table's mixed
widths). Timings are medians of interleaved rounds in one process, so ratios are side by side.

    python benchmarks/experts_cpu.py --model small
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from flexc.ir.op import call_moe_experts, moe_experts_reference  # noqa: E402


def mixed_widths(num_experts: int, intermediate: int, granule: int = 32, seed: int = 0) -> torch.Tensor:
    """Widths spread over every granule level, mean keep about 0.55 (the shape of a learned table)."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(1, intermediate // granule + 1, (num_experts,), generator=g)
    return levels * granule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--tokens", default="1,8,64,2048")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, _, _ = common.zoo_model(args.model)
    experts = model.model.layers[0].mlp.experts
    gate_up, down = experts.gate_up_proj, experts.down_proj
    num_experts, _, intermediate = down.shape
    top_k = model.config.num_experts_per_tok
    patterns = {"full": None, "uniform 0.5": torch.full((num_experts,), intermediate // 2),
                "mixed (learned-like)": mixed_widths(num_experts, intermediate)}
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        g = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, gate_up.shape[2], generator=g)
        weights, ids = torch.topk(torch.randn(tokens, num_experts, generator=g).softmax(-1), top_k)
        calls = {"stock transformers": lambda: experts(x, ids, weights)}
        for name, widths in patterns.items():
            calls[f"flexc op, {name}"] = lambda w=widths: call_moe_experts(x, ids, weights, gate_up, down, widths=w)
        calls["flexc reference loop, full"] = lambda: moe_experts_reference(x, ids, weights, gate_up, down)
        reps = max(1, 400 // max(tokens, 1)) if tokens < 2048 else 2
        times = {name: [] for name in calls}
        with torch.no_grad():
            for fn in calls.values():
                fn()
            for _ in range(args.rounds):
                for name, fn in calls.items():
                    start = time.perf_counter()
                    for _ in range(reps):
                        fn()
                    times[name].append((time.perf_counter() - start) / reps * 1e3)
        stock = statistics.median(times["stock transformers"])
        for name, t in times.items():
            ms = statistics.median(t)
            rows.append({"tokens": tokens, "impl": name, "ms": round(ms, 4), "stock_over_this": round(stock / ms, 3)})
    common.print_table(rows, ["tokens", "impl", "ms", "stock_over_this"])
    out = args.out or common.RESULTS / f"experts_cpu_{args.model}.json"
    common.write_json(out, {"model": args.model, "threads": args.threads, "rounds": args.rounds,
                            "mixed_widths": patterns["mixed (learned-like)"].tolist(), "rows": rows})


if __name__ == "__main__":
    main()
