"""Lowering cost: time and peak memory of ``flexc.ir.lower`` against the model's weight bytes.

Each model is lowered in its own process. The process loads the model, resets the kernel's
peak-RSS counter (``/proc/self/clear_refs``), lowers, and reads the peak back, so the figure
is the peak *during lowering* and the baseline is everything resident before it (Python,
torch, the weights). ``overhead`` = peak during lowering − resident before; the target is
overhead ≤ 0.3 × weights (peak ≤ 1.3 × what the model needs anyway). Lowering shares the
weights with the model, so the overhead is the tracer's own memory: roughly constant in the
model size, which the synthetic models (random weights, Qwen3-MoE shapes) show.

    python benchmarks/lowering.py --models tiny,small,synthetic-1g,qwen3-30b-a3b@meta
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, print_table, write_json  # noqa: E402

# Synthetic Qwen3-MoE shapes (random init): enough weights to make the tracer's overhead small.
SYNTHETIC = {
    "synthetic-1g": dict(hidden_size=1024, num_hidden_layers=8, num_experts=32, moe_intermediate_size=256,
                         num_experts_per_tok=4, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                         intermediate_size=2048, vocab_size=8192),
    # Qwen3-30B-A3B's shape on the meta device: nothing is allocated, the graph is the same.
    "qwen3-30b-a3b@meta": dict(hidden_size=2048, num_hidden_layers=48, num_experts=128, moe_intermediate_size=768,
                               num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                               intermediate_size=6144, vocab_size=151936, dtype="bfloat16"),
}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(name: str, warm: bool) -> dict:
    """Runs inside the child process: (warm up,) load, reset the peak, lower, report.

    ``warm`` lowers a tiny random model first, so the one-time cost of importing and
    initialising the tracer (torch.export, sympy, …: tens of MB of Python modules) is not
    counted as the cost of lowering this model.
    """
    import torch

    torch.set_num_threads(2)
    from flexc.ir import lower

    if warm:
        from flexc.ir.testing import tiny_model

        lower(tiny_model("qwen3_moe"))

    if name in SYNTHETIC:
        from transformers import AutoConfig, AutoModelForCausalLM

        shape = dict(SYNTHETIC[name])
        dtype = getattr(torch, shape.pop("dtype", "float32"))
        config = AutoConfig.for_model("qwen3_moe", **shape, norm_topk_prob=True)
        torch.manual_seed(0)
        with torch.device("meta" if name.endswith("@meta") else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    else:
        import flexc.zoo
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(flexc.zoo.resolve(name, progress=False),
                                                     dtype=torch.float32).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ptrs = {p.data_ptr() for p in model.parameters()}
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    device = next(model.parameters()).device
    graph = lower(model, {"input_ids": torch.zeros(2, 8, dtype=torch.long, device=device)})
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    shared = {p.data_ptr() for p in graph.module.parameters()} <= ptrs
    return {
        "model": name,
        "tracer_warm": warm,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_mb": weights / 2**20,  # nominal on meta: nothing is allocated
        "device": str(device),
        "rss_before_mb": before / 1024,
        "peak_during_lower_mb": peak / 1024,
        "overhead_mb": (peak - before) / 1024,
        "overhead_per_weights": (peak - before) * 1024 / weights,
        "peak_per_weights_plus_before": peak / before,
        "lower_s": seconds,
        "weights_shared": shared,
        "moe_layers": len(graph.groups),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,small,synthetic-1g")
    parser.add_argument("--modes", default="cold,warm", help="cold: first lowering in the process; warm: after "
                        "a tiny model's lowering has loaded the tracer")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "lowering.json")
    args = parser.parse_args()
    if args.child:
        name, mode = args.child.rsplit(":", 1)
        print(json.dumps(measure(name, mode == "warm")))
        return
    rows = []
    for name, mode in ((n, m) for n in args.models.split(",") for m in args.modes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--child", f"{name}:{mode}"], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"lowering {name} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, ["model", "tracer_warm", "weights_mb", "rss_before_mb", "peak_during_lower_mb", "overhead_mb",
                       "overhead_per_weights", "lower_s", "weights_shared"])
    write_json(args.out, {"benchmark": "lowering", "target": "overhead_per_weights <= 0.3", "rows": rows})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
