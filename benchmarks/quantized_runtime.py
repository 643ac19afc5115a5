"""flexc's own runtime on quantized experts (CPU): decode speed and expert memory, side by side.

Compiles a zoo model (activation ranking, ``uniform`` widths on a grid of 32, ``quantize``
round-to-nearest at ``--scheme``, group 32; cached in ``--workdir``), then in one process, rounds
interleaved, medians over rounds, at keep ``--keep``:

- the nested artifact holding int8 codes (``flexc.load``'s default for a quantized artifact: each
  expert hit dequantizes its kept prefix on the reference path);
- the same artifact as its stored float weights (``quantized=False``: the op's grouped CPU path,
  what an unquantized artifact costs);
- the quantized sliced checkpoint (its modeling code dequantizes each expert's packed codes as it runs).

Decode is greedy with a KV cache at batch 1 (``--new-tokens`` after a 16-token prompt); expert
bytes are the routed experts' tensors as held in memory.

    python benchmarks/quantized_runtime.py --model small --keep 0.5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, print_table, write_json  # noqa: E402


def compile_once(model: str, keep: float, scheme: str, workdir: Path) -> Path:
    import flexc

    out = workdir / f"{model}-{scheme}-keep{keep:g}"
    if (out / "manifest.json").is_file() and (out / "sliced").is_dir():
        return out
    data = {"builtin": "python-stdlib", "num_samples": 16, "seq_len": 128, "batch_size": 8}
    flexc.compile({"model": {"zoo": model, "dtype": "float32"}, "data": {"calibration": {**data, "split": "train"}},
                   "budgets": {"keep": [keep], "grid": 32},
                   "pipeline": [{"rank_channels": {"score": "activation", "plot": False}}, {"uniform": {"granule": 32}},
                                {"quantize": {"scheme": scheme, "group_size": 32, "method": "rtn"}}],
                   "export": {"formats": ["nested", "sliced"]}}, out=out, quiet=True, force=True)
    return out


def expert_bytes(model) -> int:
    """Bytes of the routed experts' tensors (every ``*.experts`` module's; not the width buffer)."""
    from flexc.ir.experts_impl import WIDTHS_BUFFER

    total = 0
    for name, module in model.named_modules():
        if name.endswith(".experts"):
            total += sum(t.numel() * t.element_size() for n, t in (*module.named_parameters(), *module.named_buffers())
                         if n != WIDTHS_BUFFER)
    return total


def decode_seconds(model, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--scheme", default="w4a16", choices=["w4a16", "w8a16"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "flexc" / "bench-quantized")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import flexc

    run = compile_once(args.model, args.keep, args.scheme, args.workdir)
    models = {
        "nested, int8 codes (default)": flexc.load(run / "nested", budget=args.keep),
        "nested, stored float weights": flexc.load(run / "nested", budget=args.keep, quantized=False),
        "sliced, packed codes": flexc.load(run / "sliced", budget=args.keep),
    }
    prompt = torch.randint(3, models["sliced, packed codes"].config.vocab_size, (1, 16),
                           generator=torch.Generator().manual_seed(0))
    for model in models.values():  # warm-up
        decode_seconds(model, prompt, 4)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name].append(decode_seconds(model, prompt, args.new_tokens))
    base = statistics.median(times["nested, stored float weights"])
    rows = []
    for name, model in models.items():
        t = statistics.median(times[name])
        rows.append({"model": name, "decode_tok_s": args.new_tokens / t, "vs_float": base / t,
                     "expert_MB": expert_bytes(model) / 1e6})
    print(f"{args.model}, keep {args.keep:g}, {args.scheme} group 32, decode batch 1, {args.new_tokens} tokens, "
          f"median of {args.rounds} rounds, {args.threads} threads")
    print_table(rows, ["model", "decode_tok_s", "vs_float", "expert_MB"])
    out = args.out or RESULTS / f"quantized_runtime_{args.model}.json"
    write_json(out, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                     "seconds": {k: v for k, v in times.items()}})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
