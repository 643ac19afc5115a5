"""Is channel ranking useful, and what does rank_channels cost? (zoo model, CPU)

1. Quality: held-out perplexity with the top half of every expert's channels kept by each
   score (taylor, activation, weight_activation), beside a random half and the bottom half
   (by Taylor score), and the unpruned model.
2. Cost: wall time and peak memory (RSS, one subprocess per run) of rank_channels with the
   Taylor score for several calibration-set sizes, beside the memory of the model's weights.

    python benchmarks/ranking.py --model small --out benchmarks/results/ranking_small.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from flexc.ir import lower  # noqa: E402
from flexc.passes import resolve_pass  # noqa: E402
from flexc.ir.permute import permute_expert_channels  # noqa: E402


def half_table(graph) -> torch.Tensor:
    return torch.stack([torch.full((g.num_experts,), g.intermediate_size // 2, dtype=torch.int32)
                        for g in graph.groups])


def quality(args) -> list[dict]:
    rows = []
    base_model, tokenizer, manifest = common.zoo_model(args.model)
    seq_len = manifest["recipe"]["seq_len"]

    def ppl(model):
        return common.heldout_ppl(model, tokenizer, seq_len, args.eval_tokens)

    rows.append({"kept": "all channels", "ppl": ppl(base_model)})
    data = common.calibration(tokenizer, args.samples, seq_len=seq_len)
    for score in ("taylor", "activation", "weight_activation"):
        model, _, _ = common.zoo_model(args.model)
        graph = lower(model)
        with tempfile.TemporaryDirectory() as tmp:
            resolve_pass("rank_channels")({"score": score, "plot": False})(graph, common.context(Path(tmp), tokenizer, data))
        graph.set_widths(half_table(graph))
        rows.append({"kept": f"top half ({score})", "ppl": ppl(model)})
        if score == "taylor":
            generator = torch.Generator().manual_seed(0)
            for i, g in enumerate(graph.groups):  # reverse: the lowest Taylor scores come first
                permute_expert_channels(graph, i, torch.arange(g.intermediate_size - 1, -1, -1).expand(g.num_experts, -1))
            rows.append({"kept": "bottom half (taylor)", "ppl": ppl(model)})
            for i, g in enumerate(graph.groups):
                perms = torch.stack([torch.randperm(g.intermediate_size, generator=generator)
                                     for _ in range(g.num_experts)])
                permute_expert_channels(graph, i, perms)
            rows.append({"kept": "random half", "ppl": ppl(model)})
    return rows


def cost_worker(model_name: str, samples: int) -> dict:
    model, tokenizer, manifest = common.zoo_model(model_name)
    data = common.calibration(tokenizer, samples, seq_len=manifest["recipe"]["seq_len"])
    graph = lower(model)
    before = common.current_rss_mb()
    common.reset_peak_rss()  # the peak of the pass alone, not of loading and tokenizing
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        resolve_pass("rank_channels")({"plot": False})(graph, common.context(Path(tmp), tokenizer, iter(data)))
    peak = common.peak_rss_since_reset_mb()
    return {"samples": samples, "seconds": time.perf_counter() - start, "rss_before_pass_mb": before,
            "peak_rss_mb": peak, "pass_overhead_mb": peak - before, "weights_mb": common.weight_mb(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--samples", type=int, default=128, help="calibration sequences for the quality part")
    parser.add_argument("--eval-tokens", type=int, default=100_000)
    parser.add_argument("--cost-samples", default="128,512")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cost-only", action="store_true", help="skip the quality part")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.worker is not None:
        print(json.dumps(cost_worker(args.model, args.worker)))
        return

    rows = quality(args) if not args.cost_only else []
    if rows:
        print(f"\nHeld-out perplexity, {args.model} zoo model, half of every expert's channels kept")
        common.print_table(rows, ["kept", "ppl"])
    cost = []
    for n in [int(x) for x in args.cost_samples.split(",") if x]:
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--worker", str(n)],
                             check=True, capture_output=True, text=True).stdout
        cost.append(json.loads(out.strip().splitlines()[-1]))
    print("\nrank_channels (taylor) cost")
    common.print_table(cost, ["samples", "seconds", "weights_mb", "rss_before_pass_mb", "peak_rss_mb",
                              "pass_overhead_mb"])
    out = args.out or common.RESULTS / f"ranking_{args.model}.json"
    if args.cost_only and out.is_file():  # keep the quality figures of an earlier full run
        rows = json.loads(out.read_text()).get("quality", [])
    common.write_json(out, {"model": args.model, "eval_tokens": args.eval_tokens, "calibration_samples": args.samples,
                            "quality": rows, "cost": cost, "torch_threads": 2})


if __name__ == "__main__":
    main()
