"""Held-out perplexity of checkpoints served by vLLM beside ``flexc.load``'s of the same checkpoints.

vLLM's quantized MoE kernels need not compute what flexc's runtime computes (its CPU int4 kernel
quantizes activations to 8 bits inside the kernel, docs/serving.md), so a served quantized
checkpoint's quality is measured where it is served. For each checkpoint (a sliced one, or a
nested artifact at its default budget) the same held-out token stream (the builtin corpus's
``heldout`` split, the zoo's protocol: non-overlapping windows, every token of a window but its
first scored) is scored by ``flexc.load`` + transformers (:func:`flexc.eval.perplexity.evaluate`)
and by a vLLM engine through the plugin (``prompt_logprobs``), and the engine's experts kernel
(``get_budget``) is recorded.

    python benchmarks/serve_quality.py RUN/sliced/keep_0.50 RUN_W4A16/sliced/keep_0.50 \\
        --out benchmarks/results/serve_quality.json          # in vLLM's environment

Prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import gc
import math
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def held_out_stream(directory: Path, tokens: int, seq_len: int):
    from transformers import AutoTokenizer

    from flexc.compiler.spec import DataSource
    from flexc.eval.perplexity import evaluation_stream

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    source = DataSource(builtin="python-stdlib", split="heldout", num_samples=math.ceil(tokens / seq_len),
                        seq_len=seq_len)
    return tokenizer, source, evaluation_stream(source, tokenizer, limit_tokens=tokens)


def served_perplexity(directory: Path, windows: list[list[int]], dtype: str) -> tuple[float, int, list[str]]:
    """Perplexity of the windows' tokens (all but each window's first) in a vLLM engine; the experts kernel."""
    from vllm import LLM, SamplingParams

    from flexc.serving import get_budget

    llm = LLM(model=str(directory), dtype=dtype, enforce_eager=True, max_model_len=max(map(len, windows)) + 8,
              kv_cache_memory_bytes=128 << 20, seed=0, enable_prefix_caching=False)
    try:
        kernel = get_budget(llm)["experts_kernel"]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
        nll, count = 0.0, 0
        for window, out in zip(windows, outs):
            for token, scored in zip(window[1:], out.prompt_logprobs[1:]):
                nll -= scored[token].logprob
                count += 1
    finally:
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        del llm
        gc.collect()
    return math.exp(nll / count), count, kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="sliced checkpoints or nested artifacts")
    parser.add_argument("--tokens", type=int, default=16384, help="held-out tokens scored")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the engines' dtype")
    parser.add_argument("--out", default=str(RESULTS / "serve_quality.json"))
    args = parser.parse_args()

    import torch

    import flexc
    from flexc.eval.perplexity import evaluate

    from common import write_json

    rows = []
    for checkpoint in map(Path, args.checkpoints):
        tokenizer, source, stream = held_out_stream(checkpoint, args.tokens, args.seq_len)
        windows = [w.tolist() for w in torch.split(stream, args.seq_len)]
        model = flexc.load(str(checkpoint))
        with torch.no_grad():
            reference = evaluate(model, tokenizer, source, stream=stream, batch_size=8)
        del model
        served, count, kernel = served_perplexity(checkpoint, windows, args.dtype)
        if count != reference.tokens:
            raise SystemExit(f"{checkpoint}: vLLM scored {count} tokens, flexc.load {reference.tokens}")
        rows.append({"checkpoint": str(checkpoint), "experts_kernel": kernel, "tokens": count,
                     "flexc_load_ppl": reference.perplexity, "vllm_ppl": served,
                     "ratio": served / reference.perplexity})
    print(f"{'checkpoint':<48} {'vLLM experts kernel':<20} {'tokens':>7} {'flexc.load ppl':>15} {'vLLM ppl':>9} "
          f"{'ratio':>6}")
    for r in rows:
        print(f"{r['checkpoint'][-48:]:<48} {','.join(r['experts_kernel']):<20} {r['tokens']:>7} "
              f"{r['flexc_load_ppl']:>15.3f} {r['vllm_ppl']:>9.3f} {r['ratio']:>6.4f}")
    write_json(Path(args.out), {"dtype": args.dtype, "seq_len": args.seq_len, "rows": rows})


if __name__ == "__main__":
    main()
