"""One MoE layer in vLLM: stock vLLM's fused-MoE call against a sliced layer's width buckets.

What `benchmarks/serve.py` cannot separate from the engine's own per-step cost: the experts alone.
Stock is vLLM's ``RoutedExperts`` at full width called as its MoE layer calls it
(``forward_modular``, one call, top-k routing); flexc is :class:`flexc.serving.buckets.BucketedExperts`
(one vLLM ``RoutedExperts`` per bucket, built by vLLM's factory) for several width patterns, on
the same random routing. Runs in vLLM's environment, in one process, one thread (as vLLM binds
its CPU engine here):

    python benchmarks/serve_buckets.py                      # E=16, H=I=256, top-4 (zoo `small`'s shape)
    python benchmarks/serve_buckets.py --hidden 1024 --intermediate 768

Prints stock's time per call and each pattern's speed relative to it (>1: faster), and writes
``benchmarks/results/serve_buckets.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def patterns(intermediate: int, experts: int) -> dict[str, list[int]]:
    """Width patterns at mean keep 0.5 (and one at 0.25), widths on a 32-channel grid."""
    q = experts // 4
    i = intermediate

    def grid(w: float) -> int:
        return max(32, round(w / 32) * 32)

    return {
        "1 bucket, keep 0.5": [grid(i / 2)] * experts,
        "2 buckets, keep 0.5": [grid(5 * i / 8)] * (experts // 2) + [grid(3 * i / 8)] * (experts // 2),
        "4 buckets, keep 0.5": [grid(3 * i / 4)] * q + [grid(5 * i / 8)] * q + [grid(3 * i / 8)] * q + [grid(i / 4)] * q,
        "3 buckets, keep 0.25": [grid(3 * i / 8)] * q + [grid(i / 4)] * q + [grid(i / 8)] * (experts - 2 * q),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--tokens", default="1,4,8,64,512,2048")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (the median is kept)")
    parser.add_argument("--out", default=str(RESULTS / "serve_buckets.json"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory

    from flexc.serving.buckets import BucketedExperts

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    torch.manual_seed(0)
    E, H, I, k = args.experts, args.hidden, args.intermediate, args.top_k
    config = VllmConfig()
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method="tcp://127.0.0.1:29533")
        initialize_model_parallel(1, 1)

        def prepared(experts):  # weights filled, then vLLM's post-load step (prepacking) as its loader runs it
            experts.w13_weight.data.normal_(std=0.05)
            experts.w2_weight.data.normal_(std=0.05)
            experts.quant_method.process_weights_after_loading(experts)

        stock = FusedMoEFactory(num_experts=E, top_k=k, hidden_size=H, intermediate_size=I, renormalize=False,
                                prefix="stock").routed_experts
        prepared(stock)
        layers = {}
        for name, widths in patterns(I, E).items():
            layer = BucketedExperts(widths, H, ("silu", 1.702, 7.0), f"flexc.{len(layers)}", k)
            assert layer.kernel == "vllm"
            for bucket in layer.kernels:
                prepared(bucket.experts)
            layers[name] = layer

        def timed(fn, calls: int) -> float:
            fn()
            runs = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                runs.append((time.perf_counter() - start) / calls)
            return statistics.median(runs)

        rows = []
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(tokens, H)
            ids = torch.stack([torch.randperm(E)[:k] for _ in range(tokens)])
            weights = torch.rand(tokens, k)
            calls = max(1, 20_000 // (tokens * 10))
            base = timed(lambda: stock.forward_modular(x, weights, ids.to(torch.int32)), calls)
            row = {"tokens": tokens, "stock_us": base * 1e6}
            for name, layer in layers.items():
                row[name] = base / timed(lambda: layer(x, ids, weights), calls)
            rows.append(row)
    names = list(layers)
    print(f"E={E} H={H} I={I} top-{k}, {os.environ['OMP_NUM_THREADS']} thread(s); stock µs per call, then "
          "stock time / flexc buckets time (>1: faster)")
    print(f"{'tokens':>7} {'stock µs':>9} " + " ".join(f"{n:>21}" for n in names))
    for r in rows:
        print(f"{r['tokens']:>7} {r['stock_us']:>9.0f} " + " ".join(f"{r[n]:>21.2f}" for n in names))
    out = {"experts": E, "hidden": H, "intermediate": I, "top_k": k, "threads": os.environ["OMP_NUM_THREADS"],
           "patterns": patterns(I, E), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
