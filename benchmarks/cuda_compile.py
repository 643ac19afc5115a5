"""A whole flexc compile on CUDA of a model with Qwen3-30B-A3B's layer shapes, then the nested
runtime's decode speed per budget.

    python benchmarks/cuda_compile.py --layers 4 --out cuda_compile.json

The model is Qwen3-30B-A3B's decoder layer (hidden 2048, 128 experts of width 768, top-8,
32 query / 4 key-value heads of 128) repeated ``--layers`` times, with random bf16 weights and
the `tiny` zoo model's tokenizer (so the built-in corpus can calibrate it without a download).
Random weights say nothing about quality; this measures that the method's CUDA path runs at this
shape (Taylor ranking, gates, the tracking anneal, folding, Triton kernels) and what it costs:
seconds per stage, peak GPU memory, disk written, and the nested model's decode time per token at
each budget with the Triton kernels against the same model at full width.

``--smoke`` runs it on a CPU with a toy shape (checks the script; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QWEN3_30B_LAYER = dict(hidden_size=2048, num_experts=128, moe_intermediate_size=768, num_experts_per_tok=8,
                       num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                       norm_topk_prob=True, max_position_embeddings=4096)
SMOKE_LAYER = dict(hidden_size=64, num_experts=8, moe_intermediate_size=64, num_experts_per_tok=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                   norm_topk_prob=True, max_position_embeddings=512)
BUDGETS = (0.75, 0.5, 0.25)


def build_model(directory: Path, tokenizer_dir: Path, layers: int, shape: dict, dtype: torch.dtype,
                device: str) -> dict:
    """Random-weight Qwen3-MoE with ``shape`` per layer, saved with the zoo tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model("qwen3_moe", num_hidden_layers=layers, vocab_size=len(tokenizer),
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    start = time.perf_counter()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    params = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    del model
    return {"parameters": params, "expert_parameters": experts, "save_s": time.perf_counter() - start,
            "bytes_on_disk": sum(f.stat().st_size for f in directory.iterdir())}


def spec_text(model_dir: Path, out_dir: Path, device: str, dtype: str, samples: int, seq_len: int) -> str:
    return f"""\
model: {{path: {model_dir}, dtype: {dtype}, device: {device}}}
data:
  calibration: {{builtin: python-stdlib, split: train, num_samples: {samples}, seq_len: {seq_len}, batch_size: 8}}
budgets: {{keep: {list(BUDGETS)}, metric: params}}
pipeline:
  - rank_channels: {{score: taylor}}
  - insert_action_gates
  - anneal: {{schedule: track}}
  - fold_masks
export: {{dir: {out_dir}, formats: [nested, sliced]}}
seed: 0
"""


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def decode_times(nested: Path, device: str, dtype: torch.dtype, tokens: int, backend: str) -> dict:
    """Milliseconds per decoded token (batch 1, greedy, KV cache) at full width and each budget."""
    import flexc

    model = flexc.load(nested, budget=None, dtype=dtype, device=device, backend=backend)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=device,
                           generator=torch.Generator(device).manual_seed(0))
    out = {}
    with torch.no_grad():  # warm-up: every budget's kernels compiled before any is timed
        for budget in (1.0, *BUDGETS):
            model.set_budget(budget)
            model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    for budget in (1.0, *BUDGETS):
        model.set_budget(budget)
        with torch.no_grad():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        out[str(budget)] = 1000 * (time.perf_counter() - start) / tokens
    switch = []
    for budget in BUDGETS * 3:
        start = time.perf_counter()
        model.set_budget(budget)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        switch.append(1e6 * (time.perf_counter() - start))
    return {"ms_per_token": out, "switch_us_median": sorted(switch)[len(switch) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens timed per budget")
    ap.add_argument("--work", type=Path, default=Path("/tmp/flexc-cuda-compile"))
    ap.add_argument("--out", type=Path, default=Path("cuda_compile.json"))
    ap.add_argument("--smoke", action="store_true", help="toy shape on the CPU (checks the script only)")
    args = ap.parse_args()

    import flexc
    import flexc.zoo

    device = "cpu" if args.smoke else "cuda"
    dtype_name = "float32" if args.smoke else "bfloat16"
    dtype = getattr(torch, dtype_name)
    shape = SMOKE_LAYER if args.smoke else QWEN3_30B_LAYER
    if args.smoke:
        args.samples, args.seq_len, args.tokens = 16, 64, 4
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    model_dir, out_dir = args.work / "model", args.work / "run"

    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "layers": args.layers, "shape": shape, "dtype": dtype_name,
              "calibration": {"samples": args.samples, "seq_len": args.seq_len}}
    result["model"] = build_model(model_dir, flexc.zoo.resolve("tiny"), args.layers, shape, dtype, device)
    print(f"model: {result['model']['parameters'] / 1e9:.2f}B parameters "
          f"({result['model']['expert_parameters'] / 1e9:.2f}B in experts), "
          f"{result['model']['bytes_on_disk'] / 2**30:.2f} GiB on disk", flush=True)

    spec_path = args.work / "spec.yaml"
    spec_path.write_text(spec_text(model_dir, out_dir, device, dtype_name, args.samples, args.seq_len))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    compiled = flexc.compile(flexc.Spec.from_yaml(spec_path), seed=0)
    result["compile_s"] = time.perf_counter() - start
    if device == "cuda":
        result["compile_peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["stages"] = [{k: r.get(k) for k in ("name", "status", "seconds")}
                        for r in compiled.manifest.get("stages", [])]
    result["run_dir_gib"] = disk_bytes(out_dir) / 2**30
    result["run_dir_parts_gib"] = {p.name: disk_bytes(p) / 2**30 for p in sorted(out_dir.iterdir()) if p.is_dir()}
    for stage in result["stages"]:
        print(f"  {stage['name']:<24} {stage['status']:<8} {stage['seconds'] or 0:8.1f} s", flush=True)
    print(f"compile: {result['compile_s']:.1f} s, peak GPU {result.get('compile_peak_gpu_gib', 0):.1f} GiB, "
          f"run dir {result['run_dir_gib']:.2f} GiB", flush=True)

    del compiled
    if device == "cuda":
        torch.cuda.empty_cache()
    backend = "reference" if args.smoke else "triton"
    result["decode"] = decode_times(out_dir / "nested", device, dtype, args.tokens, backend)
    full = result["decode"]["ms_per_token"]["1.0"]
    for budget, ms in result["decode"]["ms_per_token"].items():
        print(f"  decode keep {budget:<5} {ms:7.2f} ms/token  ({ms / full:.2f}x full)", flush=True)
    print(f"  budget switch: {result['decode']['switch_us_median']:.0f} us (median)", flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
