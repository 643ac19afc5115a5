"""Peak memory of a streamed compile against model size: flat in the model's depth.

Builds synthetic Qwen3-MoE-shaped checkpoints with random bf16 weights, shard by shard (one
decoder layer in memory at a time, never the whole model), at several sizes, and compiles
each with rank_channels(activation; ``--score taylor`` for the streamed backward) -> coverage -> fold_masks -> sliced export under
``execution: {stream: layers}`` in a child process that reports its peak resident memory
(``ru_maxrss``, which counts torch's and Python's own memory too; the resident memory after
imports is reported beside it). The in-memory compile of the same spec runs at the small
sizes for comparison. Prints a table, writes ``benchmarks/results/scale.json`` and
``scale.png`` (peak against size).

    python benchmarks/scale.py                        # 1, 2, 4 GB streamed; in memory at 1, 2 GB
    python benchmarks/scale.py --sizes 20 --in-memory --append   # adds a 20 GB model (~35 GB of free disk)
    python benchmarks/scale.py --sizes 0.3 --in-memory 0.3   # a quick check of the script
    python benchmarks/scale.py --sizes 4 --in-memory --score taylor --out benchmarks/results/scale_taylor.json
    python benchmarks/scale.py --processes --sizes 1 --in-memory 1   # wall time: 1 process vs torchrun with 2
    python benchmarks/scale.py --sizes 4 --in-memory --score taylor --anneal 20 --samples 2 --batch-size 1 \
        --out benchmarks/results/scale_anneal.json   # Taylor ranking and 20 anneal steps, streamed
    python benchmarks/scale.py --sizes 4 --in-memory --recover 5 --samples 2 --batch-size 1 \
        --out benchmarks/results/scale_recover.json   # coverage, then 5 LoRA fine-tune steps, streamed
    python benchmarks/scale.py --sizes 1 2 --in-memory 1 2 --quantize w4a16 --samples 4 --batch-size 2 \
        --out benchmarks/results/scale_quantize.json   # coverage, then GPTQ int4, streamed and in memory

With ``--processes`` each compile runs as ``flexc compile`` (one process on every core, and
one process of one thread) and as ``torchrun --nproc_per_node 2 flexc compile`` (2 processes
sharing the cores), with 4x the calibration data, and the wall times are written side by side
to ``benchmarks/results/scale_processes.json``.

Every model has the same layer shape (hidden 1024, 64 experts of width 384, top-8, 32k
vocabulary: 155 MB per decoder layer in bf16); sizes differ by depth.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SHAPE = dict(hidden_size=1024, num_experts=64, moe_intermediate_size=384, num_experts_per_tok=8,
             intermediate_size=2048, num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=32000,
             max_position_embeddings=4096, tie_word_embeddings=False, norm_topk_prob=True, decoder_sparse_step=1,
             mlp_only_layers=[], bos_token_id=1, eos_token_id=2, pad_token_id=0)
BUDGET = 0.5


# --------------------------------------------------------------------------- building a model


def _config(num_layers: int):
    from transformers import Qwen3MoeConfig

    # architectures: what vLLM reads to serve it as a causal LM (benchmarks/serve.py --stock)
    return Qwen3MoeConfig(num_hidden_layers=num_layers, dtype="bfloat16", architectures=["Qwen3MoeForCausalLM"],
                          **SHAPE)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from flexc.data.corpus import stdlib_documents

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([d.text for d in stdlib_documents("train")[:200]], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def layer_sizes() -> tuple[int, int]:
    """Bytes (bf16) of one decoder layer, and of everything else (embeddings, norm, LM head)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(1), dtype=torch.bfloat16)
    layer = sum(p.numel() for p in model.model.layers[0].parameters()) * 2
    return layer, sum(p.numel() for p in model.parameters()) * 2 - layer


def build(directory: Path, gigabytes: float, seed: int = 0) -> dict:
    """A random Qwen3-MoE checkpoint of about ``gigabytes`` GB, written one decoder layer at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    from flexc.export.streamed import ShardWriter
    from flexc.ir.streaming import to_checkpoint_names

    layer_bytes, rest_bytes = layer_sizes()
    num_layers = max(1, round((gigabytes * 1e9 - rest_bytes) / layer_bytes))
    config = _config(num_layers)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)

    def fill(named) -> dict:
        out = {}
        for name, p in named:
            if p.dim() >= 2:
                out[name] = (torch.randn(p.shape, generator=generator, dtype=torch.float32) * 0.02).to(torch.bfloat16)
            else:
                out[name] = torch.ones(p.shape, dtype=torch.bfloat16)
        return out

    writer = ShardWriter(directory, num_layers + 1)
    for i in range(num_layers):
        layer = model.model.layers[i]
        writer.write(to_checkpoint_names(model, fill((f"model.layers.{i}.{n}", p) for n, p in layer.named_parameters())))
    writer.write(to_checkpoint_names(model, fill((n, p) for n, p in model.named_parameters() if ".layers." not in n)))
    writer.close()
    config.save_pretrained(directory)
    _tokenizer().save_pretrained(directory)
    return {"layers": num_layers, "bytes": writer.bytes_written, "layer_bytes": layer_bytes}


# --------------------------------------------------------------------------- one compile, in a child


def spec_for(model_dir: Path, out: Path, stream: str, score: str = "activation", samples: int = 8,
             anneal: int = 0, batch_size: int = 4, recover: int = 0, quantize: str | None = None) -> dict:
    """rank_channels -> coverage (or, with ``anneal`` steps, action gates and the anneal) -> fold (-> with
    ``recover`` steps, the LoRA fine-tune at the budget) (-> with ``quantize``, GPTQ at that scheme, groups of
    32) -> sliced."""
    widths = ([{"insert_action_gates": {"granule": 32}}, {"anneal": {"steps": anneal, "selection": {"samples": 0}}}] if anneal
              else [{"coverage": {"granule": 32}}])
    tune = [{"recover": {"keep": BUDGET, "steps": recover, "checkpoint_every": recover}}] if recover else []
    tune += [{"quantize": {"scheme": quantize, "group_size": 32, "method": "gptq"}}] if quantize else []
    return {
        "model": {"path": str(model_dir), "dtype": "bfloat16"},
        "data": {"calibration": {"builtin": "python-stdlib", "num_samples": samples, "seq_len": 128,
                                 "batch_size": batch_size}},
        "budgets": {"keep": [BUDGET], **({"grid": 32} if quantize else {})},  # whole quantization groups
        "pipeline": [{"rank_channels": {"score": score, "plot": False}}, *widths, "fold_masks", *tune],
        "export": {"dir": str(out), "formats": ["sliced"]},
        "execution": {"stream": stream},
    }


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def child(spec_file: str, result_file: str) -> None:
    import torch

    torch.set_num_threads(2)
    import flexc  # noqa: F401 -- imported before the baseline is read
    from flexc.compiler import driver  # noqa: F401
    import transformers  # noqa: F401

    spec = json.loads(Path(spec_file).read_text())
    baseline = _rss_mb()
    start = time.perf_counter()
    flexc.compile(spec, quiet=True, force=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = Path(spec["export"]["dir"])
    manifest = json.loads((out / "manifest.json").read_text())
    stages = {s["name"]: {k: s.get(k) for k in ("seconds", "disk_bytes", "peak_live_layers")}
              for s in manifest["stages"]}
    if spec["execution"]["stream"] == "off":  # state/ holds every weight; it is rewritten after each pass
        passes = [n for n in stages if n[:2].isdigit()]
        state = _du(out / "state")
        for n in passes:
            stages[n]["disk_bytes"] = _du(out / "stages" / n) + state
        stages["export:sliced"]["disk_bytes"] = _du(out / "sliced")
    Path(result_file).write_text(json.dumps({"peak_mb": peak, "baseline_mb": baseline, "seconds": seconds,
                                             "stages": stages}))


def run_child(spec: dict, work: Path) -> dict:
    spec_file, result_file = work / "spec.json", work / "result.json"
    spec_file.write_text(json.dumps(spec))
    result_file.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, __file__, "--child", str(spec_file), str(result_file)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"compile failed:\n{done.stderr[-4000:]}")
    return json.loads(result_file.read_text())


# --------------------------------------------------------------------------- 1 vs 2 processes


def run_processes(spec: dict, work: Path, processes: int, threads: int) -> dict:
    """Wall time of the ``flexc compile`` command with ``processes`` processes of ``threads`` threads."""
    import socket

    spec_file = work / "spec.yaml"
    spec_file.write_text(json.dumps(spec))  # JSON is YAML
    if processes == 1:
        launcher = [sys.executable, "-m", "flexc.cli"]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_port", str(port), "-m", "flexc.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run([*launcher, "compile", str(spec_file), "--force", "-q"], env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"compile with {processes} process(es) failed:\n{done.stderr[-4000:]}")
    manifest = json.loads((Path(spec["export"]["dir"]) / "manifest.json").read_text())
    return {"processes": processes, "threads_each": threads, "seconds": round(seconds, 1),
            "stages": {s["name"]: s.get("seconds") for s in manifest["stages"]}}


def compare_processes(args, work: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    # one process on every core, one process of one thread (what a busy machine favours), torchrun on every core
    runs = [(1, cores), (1, 1), (2, max(1, cores // 2))]
    rows = []
    for gb in args.sizes:
        model_dir = work / f"model-{gb:g}gb"
        built = build(model_dir, gb)
        for mode in ["layers"] + (["off"] if gb in args.in_memory else []):
            for processes, threads in runs:
                out = work / f"run-{gb:g}gb-{mode}-{processes}x{threads}"
                res = run_processes(spec_for(model_dir, out, mode, samples=4 * 8), work, processes, threads)
                rows.append({"model_gb": round(built["bytes"] / 1e9, 3), "layers": built["layers"], "stream": mode,
                             **res})
                print(f"{built['bytes'] / 1e9:5.2f} GB {mode:6s} {processes} process(es) x {threads} thread(s): "
                      f"{res['seconds']:6.1f}s (rank_channels {res['stages'].get('01-rank_channels')}s)", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(model_dir, ignore_errors=True)
    out = args.out if args.out != RESULTS / "scale.json" else RESULTS / "scale_processes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": SHAPE, "budget_keep": BUDGET, "calibration": "32 x 128 tokens, batches of 4",
                               "cores": cores, "load_average": os.getloadavg(), "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


# --------------------------------------------------------------------------- main


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("layers", "o-"), ("off", "s--")):
        pts = sorted((r["model_gb"], r["peak_mb"] / 1024) for r in rows if r["stream"] == mode)
        if pts:
            ax.plot(*zip(*pts), style, label="streamed (one layer at a time)" if mode == "layers" else "in memory")
    sizes = [r["model_gb"] for r in rows]
    ax.plot([0, max(sizes)], [0, max(sizes)], ":", color="grey", label="model size")
    ax.set_xlabel("model size on disk (GB, bf16)")
    ax.set_ylabel("peak resident memory (GB)")
    widths = f"anneal ({rows[0]['anneal_steps']} steps)" if rows[0].get("anneal_steps") else "coverage"
    tune = f" → recover ({rows[0]['recover_steps']} steps)" if rows[0].get("recover_steps") else ""
    tune += f" → quantize ({rows[0]['quantize']})" if rows[0].get("quantize") else ""
    ax.set_title(f"flexc compile: rank({rows[0].get('score', 'activation')}) → {widths} → fold{tune} → sliced")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 2, 4], help="model sizes in GB (streamed)")
    parser.add_argument("--in-memory", type=float, nargs="*", default=[1, 2], help="sizes also compiled in memory")
    parser.add_argument("--workdir", type=Path, default=None, help="where models and runs go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    parser.add_argument("--keep", action="store_true", help="keep the models and runs")
    parser.add_argument("--append", action="store_true", help="add the rows to those already in --out")
    parser.add_argument("--score", default="activation", help="rank_channels' score (taylor: the streamed backward)")
    parser.add_argument("--anneal", type=int, default=0, metavar="STEPS",
                        help="train the action gates this many steps (insert_action_gates + anneal) instead of coverage")
    parser.add_argument("--recover", type=int, default=0, metavar="STEPS",
                        help="then fine-tune LoRA adapters (recover) this many steps at the budget")
    parser.add_argument("--quantize", default=None, metavar="SCHEME",
                        help="then quantize the experts (w8a16 or w4a16, GPTQ, groups of 32)")
    parser.add_argument("--samples", type=int, default=8, help="calibration sequences (128 tokens each)")
    parser.add_argument("--batch-size", type=int, default=4, help="calibration sequences per batch")
    parser.add_argument("--processes", action="store_true", help="wall time of 1 process vs torchrun with 2")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="flexc-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.processes:
        try:
            return compare_processes(args, work)
        finally:
            if not args.keep and args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
    rows = []
    try:
        for gb in args.sizes:
            model_dir = work / f"model-{gb:g}gb"
            start = time.perf_counter()
            built = build(model_dir, gb)
            built["build_seconds"] = round(time.perf_counter() - start, 1)
            print(f"built {model_dir.name}: {built['layers']} layers, {built['bytes'] / 1e9:.2f} GB "
                  f"in {built['build_seconds']:.0f}s", flush=True)
            modes = ["layers"] + (["off"] if gb in args.in_memory else [])
            for mode in modes:
                out = work / f"run-{gb:g}gb-{mode}"
                res = run_child(spec_for(model_dir, out, mode, args.score, args.samples, args.anneal,
                                         args.batch_size, args.recover, args.quantize), work)
                row = {"model_gb": round(built["bytes"] / 1e9, 3), "layers": built["layers"],
                       "layer_mb": round(built["layer_bytes"] / 1e6, 1), "stream": mode, "score": args.score,
                       "anneal_steps": args.anneal, "recover_steps": args.recover, "quantize": args.quantize,
                       "calibration": f"{args.samples} x 128 tokens, "
                                                                   f"batches of {args.batch_size}",
                       **{k: round(v, 1) for k, v in res.items() if k != "stages"}, "stages": res["stages"]}
                rows.append(row)
                print(f"  {mode:6s} peak {row['peak_mb']:8.0f} MB (after imports {row['baseline_mb']:.0f} MB) "
                      f"in {row['seconds']:.0f}s", flush=True)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(model_dir, ignore_errors=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    if args.append and args.out.is_file():
        rows = json.loads(args.out.read_text())["rows"] + rows
    print()
    print(f"{'model GB':>8} {'layers':>6} {'mode':>9} {'peak MB':>8} {'imports MB':>10} {'seconds':>8}  "
          "disk written per stage (MB)")
    for r in rows:
        disk = ", ".join(f"{n}: {(s.get('disk_bytes') or 0) / 1e6:.0f}" for n, s in r["stages"].items()
                         if s.get("disk_bytes") is not None)
        print(f"{r['model_gb']:8.2f} {r['layers']:6d} {'streamed' if r['stream'] == 'layers' else 'in memory':>9} "
              f"{r['peak_mb']:8.0f} {r['baseline_mb']:10.0f} {r['seconds']:8.0f}  {disk}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"shape": SHAPE, "budget_keep": BUDGET, "rows": rows}, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
