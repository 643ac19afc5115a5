"""One MoE layer's experts on CPU: stock transformers vs flexc's op, by width pattern and tokens.

The op runs grouped GEMMs for every width pattern (flexc/ir/grouped.py): one run when every
expert hit shares a width, and for mixed widths (a learned table) either one run padded to the
widest expert hit or one run per distinct width, by how many multiply-adds padding would waste.
The old path for mixed widths, the per-expert reference loop, is timed beside it on the same
pattern (``loop_over_this``: the loop's time over the op's). Timings are medians of interleaved
rounds in one process, so ratios are side by side. Wall-clock times move with every other
process on the machine; on a shared machine ``--clock process --threads 1`` counts this
process's CPU time instead, which other processes move far less (with one thread there are no
idle worker threads to count; caches they share still move it).

Width patterns (E experts, intermediate size I):

- ``full``, ``uniform 0.5``: one width for every expert;
- ``4 widths``: a learned-style table with 4 distinct widths, I/4, I/2, 3I/4 and I on 3/8,
  3/8, 1/8 and 1/8 of the experts (mean keep 0.5; at I=256 on flexc.ir.buckets' 64 grid);
- ``4 widths, 0s``: 4 distinct widths with removed experts, 0, I/2, 3I/4 and I on 1/4, 3/8,
  1/4 and 1/8 of the experts (mean keep 0.5);
- ``8 levels``: widths spread over every 32-channel level (mean keep about 0.55), more
  distinct widths than a learned table holds.

``--strategies`` adds the mixed-width path forced to pad (``pad``) and to one run per width
(``group``) on the mixed patterns: the figures behind ``flexc.ir.grouped.PAD_MACS_PER_RUN``.
``--synthetic`` times the zoo recipe's architecture, untrained (no zoo build; same shapes).

    python benchmarks/experts_cpu.py --model small
    python benchmarks/experts_cpu.py --model small --synthetic --strategies --threads 1 --clock process
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

from flexc.ir.grouped import moe_experts_cpu  # noqa: E402
from flexc.ir.op import ExpertWeights, moe_experts_reference, run_experts  # noqa: E402


def level_widths(num_experts: int, intermediate: int, granule: int = 32, seed: int = 0) -> torch.Tensor:
    """Widths spread over every granule level, mean keep about 0.55."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(1, intermediate // granule + 1, (num_experts,), generator=g)
    return levels * granule


def tiered_widths(num_experts: int, intermediate: int, tiers: dict[float, float], seed: int = 0) -> torch.Tensor:
    """A learned-style table: ``tiers`` maps keep fraction -> share of the experts (few distinct
    widths), the experts assigned by a seeded permutation."""
    values = []
    for keep, share in tiers.items():
        values += [round(keep * intermediate)] * round(share * num_experts)
    values = (values + [values[-1]] * num_experts)[:num_experts]
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(values, dtype=torch.int32)[torch.randperm(num_experts, generator=g)]


def load_experts(name: str, synthetic: bool):
    """The first MoE layer's experts module of zoo model ``name`` (or of its recipe, untrained)."""
    if synthetic:
        from transformers import AutoModelForCausalLM

        from flexc.zoo.recipes import RECIPES

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(RECIPES[name].model_config(), dtype=torch.float32).eval()
    else:
        model, _, _ = common.zoo_model(name)
    return model.model.layers[0].mlp.experts, model.config.num_experts_per_tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--synthetic", action="store_true", help="the recipe's architecture untrained, no zoo build")
    parser.add_argument("--tokens", default="1,8,64,512,2048")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--strategies", action="store_true", help="also time the mixed path forced to pad / group")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="wall-clock time, or this process's CPU time (shared machines; with --threads 1)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)

    experts, top_k = load_experts(args.model, args.synthetic)
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    canonical = ExpertWeights(gate_up, down)  # the op's view of the module's weights
    num_experts, _, intermediate = down.shape
    patterns = {
        "full": None,
        "uniform 0.5": torch.full((num_experts,), intermediate // 2, dtype=torch.int32),
        "4 widths": tiered_widths(num_experts, intermediate, {0.25: 3 / 8, 0.5: 3 / 8, 0.75: 1 / 8, 1.0: 1 / 8}),
        "4 widths, 0s": tiered_widths(num_experts, intermediate, {0.0: 1 / 4, 0.5: 3 / 8, 0.75: 1 / 4, 1.0: 1 / 8}),
        "8 levels": level_widths(num_experts, intermediate),
    }
    mixed = ["4 widths", "4 widths, 0s", "8 levels"]
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        g = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, gate_up.shape[2], generator=g)
        weights, ids = torch.topk(torch.randn(tokens, num_experts, generator=g).softmax(-1), top_k)
        calls = {("stock transformers", "-"): lambda: experts(x, ids, weights)}
        for name, widths in patterns.items():
            calls[("flexc op", name)] = lambda w=widths: run_experts(x, ids, weights, canonical, w)
        for name in ["full", *mixed]:
            calls[("reference loop", name)] = lambda w=patterns[name]: moe_experts_reference(x, ids, weights, canonical, w)
        if args.strategies:
            for name in mixed:
                for strategy in ("pad", "group"):
                    calls[(f"mixed path, {strategy}", name)] = lambda w=patterns[name], s=strategy: moe_experts_cpu(
                        x, ids, weights, canonical, w, strategy=s)
        reps = max(1, 400 // max(tokens, 1)) if tokens < 2048 else 2
        with torch.no_grad():
            # a forced strategy the path declines (None: the op would run the loop) is left out
            calls = {key: fn for key, fn in calls.items() if fn() is not None}
            times = {key: [] for key in calls}
            for _ in range(args.rounds):
                for key, fn in calls.items():
                    start = clock()
                    for _ in range(reps):
                        fn()
                    times[key].append((clock() - start) / reps * 1e3)
        ms = {key: statistics.median(t) for key, t in times.items()}
        stock = ms[("stock transformers", "-")]
        for (impl, pattern), t in ms.items():
            loop = ms.get(("reference loop", pattern)) if impl != "reference loop" else None
            distinct = "-" if patterns.get(pattern) is None else len(torch.unique(patterns[pattern][ids]))
            rows.append({"tokens": tokens, "impl": impl, "widths": pattern, "hit_widths": distinct,
                         "ms": round(t, 4), "stock_over_this": round(stock / t, 3),
                         "loop_over_this": None if loop is None else round(loop / t, 3)})
    common.print_table(rows, ["tokens", "impl", "widths", "hit_widths", "ms", "stock_over_this", "loop_over_this"])
    out = args.out or common.RESULTS / f"experts_cpu_{args.model}{'_synthetic' if args.synthetic else ''}.json"
    common.write_json(out, {"model": args.model, "synthetic": args.synthetic, "threads": args.threads,
                            "clock": args.clock, "rounds": args.rounds, "torch": torch.__version__,
                            "widths": {n: w.tolist() for n, w in patterns.items() if w is not None}, "rows": rows})


if __name__ == "__main__":
    main()
