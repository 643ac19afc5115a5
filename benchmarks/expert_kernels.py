"""Speed of flexc's variable-width expert kernels against transformers' experts implementations.

One command on any CUDA machine::

    python benchmarks/expert_kernels.py --out results.json

For the expert shapes of Qwen3-30B-A3B (E=128, H=2048, I=768, top-8) and Mixtral-8x7B (E=8,
H=4096, I=14336, top-2), bf16, batches 1..4096 tokens, keep 1.0/0.75/0.5/0.25 (uniform widths
rounded to the 16-channel granule) plus a random per-expert mix with mean keep 0.5, it times:

- ``flexc``: the Triton kernels (``flexc.kernels.dispatch.triton_forward``, configs from the
  shipped table for this GPU, or tuned first with ``--tune``);
- ``grouped_mm``: transformers' ``grouped_mm`` experts forward at full width, and
  ``grouped_mm_sliced``: the same on weights physically sliced to the uniform width (what a
  per-budget sliced checkpoint would run);
- ``batched_mm`` (where its per-pair weight copies fit in 2 GB) and the reference op
  (``flexc.ir.op.moe_experts_reference``, batches <= 16) for scale;

plus the GPU's measured copy bandwidth (bytes read + written) and bf16 matmul rate. All
timings are medians of CUDA-graph replays (``triton.testing.do_bench_cudagraph``) except the
reference op (it synchronises; timed eagerly). Each timed call cycles through several random
routings so that one call's experts are not left in L2 for the next. GB/s counts the weight
bytes of the experts actually hit, up to their widths, plus activations in and out; TFLOP/s
counts 2*3*H*width per (token, slot) pair. Every flexc result is checked against the
reference op (fp32) on the first routing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = {
    "qwen3-30b-a3b": dict(E=128, H=2048, I=768, k=8),
    "mixtral-8x7b": dict(E=8, H=4096, I=14336, k=2),
}
SMOKE_SHAPES = {"tiny": dict(E=8, H=64, I=64, k=2)}
BATCHES = (1, 2, 4, 8, 16, 64, 256, 1024, 4096)
KEEPS = (1.0, 0.75, 0.5, 0.25)
GRANULE = 16
N_SETS = 4
DEV = "cuda"
DTYPE = torch.bfloat16
SMOKE = False  # --smoke: tiny shape on the CPU in Triton's interpreter, wall-clock timing (checks this script)


def log(*a):
    print(*a, flush=True)


def measure_copy_bandwidth(gib: float = 1.0) -> float:
    import triton.testing

    n = int(gib * 2**30) // 2
    src = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def measure_matmul_tflops(n: int = 8192) -> float:
    import triton.testing

    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=300, return_mode="median")
    return 2 * n**3 / (ms * 1e-3) / 1e12


class _HFExperts(torch.nn.Module):
    """The attributes transformers' experts forwards read (a Qwen3-MoE/Mixtral-style module)."""

    def __init__(self, gate_up, down):
        super().__init__()
        self.gate_up_proj = gate_up
        self.down_proj = down
        self.num_experts = gate_up.shape[0]
        self.has_gate, self.has_bias, self.is_transposed, self.is_concatenated = True, False, False, True
        self.has_post_expert_norm = False
        self._is_expert_parallel = False
        self.act_fn = torch.nn.SiLU()

    def _apply_gate(self, gate_up_out):
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def uniform_widths(keep: float, E: int, I: int) -> torch.Tensor:
    w = int(round(keep * I / GRANULE)) * GRANULE
    return torch.full((E,), min(I, max(0, w)), dtype=torch.int32, device=DEV)


def mixed_widths(keep: float, E: int, I: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(E, generator=g) + 0.5  # mean 1
    r = r / r.mean()
    w = (torch.round(keep * I * r / GRANULE) * GRANULE).clamp(0, I).to(torch.int32)
    return w.to(DEV)


def routing_sets(E, H, k, T, n_sets, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        x = torch.randn(T, H, device=DEV, dtype=DTYPE, generator=g)
        logits = torch.randn(T, E, device=DEV, generator=g)
        tw, ids = logits.softmax(-1).topk(k, dim=-1)
        sets.append((x, ids, tw.to(DTYPE)))
    return sets


def work(sets, widths, H, I):
    """(weight bytes, activation bytes, flops) per call, averaged over the routing sets."""
    wb = ab = fl = 0.0
    wcpu = widths.cpu().long() if widths is not None else None
    for x, ids, _ in sets:
        T = x.shape[0]
        flat = ids.reshape(-1).cpu()
        w_pairs = wcpu[flat] if wcpu is not None else torch.full_like(flat, I)
        hit = torch.unique(flat)
        w_hit = wcpu[hit] if wcpu is not None else torch.full_like(hit, I)
        wb += 3 * H * int(w_hit.sum()) * 2
        ab += 2 * T * H * 2
        fl += 2 * 3 * H * int(w_pairs.sum())
    n = len(sets)
    return wb / n, ab / n, fl / n


def _wall_ms(fn):
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def bench_graph(fn_per_set, sets, rep_ms):
    from flexc.kernels.tuning import time_fn

    def all_sets():
        for s in sets:
            fn_per_set(*s)

    all_sets()
    if SMOKE:
        return _wall_ms(all_sets) / len(sets)
    torch.cuda.synchronize()
    return time_fn(all_sets, graph=True, rep_ms=rep_ms) / len(sets)


def bench_eager(fn_per_set, sets, rep_ms):
    def all_sets():
        for s in sets:
            fn_per_set(*s)

    all_sets()
    if SMOKE:
        return _wall_ms(all_sets) / len(sets)
    import triton.testing

    torch.cuda.synchronize()
    return triton.testing.do_bench(all_sets, warmup=5, rep=rep_ms, return_mode="median") / len(sets)


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def run_shape(name, spec, batches, keeps, with_mix, rep_ms, results, check=True):
    from transformers.integrations.moe import batched_mm_experts_forward, grouped_mm_experts_forward

    from flexc.ir.op import ExpertWeights, moe_experts_reference
    from flexc.kernels.dispatch import triton_forward
    from flexc.kernels.tuning import lookup_config

    E, H, I, k = spec["E"], spec["H"], spec["I"], spec["k"]
    g = torch.Generator(device=DEV).manual_seed(0)
    gate_up = torch.randn(E, 2 * I, H, device=DEV, dtype=DTYPE, generator=g).mul_(H**-0.5)
    down = torch.randn(E, H, I, device=DEV, dtype=DTYPE, generator=g).mul_(I**-0.5)
    hf = _HFExperts(gate_up, down)
    experts = ExpertWeights(gate_up, down)
    gate_up32 = down32 = None
    if check:
        gate_up32, down32 = gate_up.float(), down.float()
    variants = [(f"keep{kp:g}", uniform_widths(kp, E, I), kp) for kp in keeps]
    if with_mix:
        variants.append(("mix0.5", mixed_widths(0.5, E, I), 0.5))
    sliced = {}
    for label, widths, kp in variants:
        if label.startswith("keep") and kp < 1.0:
            w = int(widths[0])
            gu = torch.cat([gate_up[:, :w], gate_up[:, I:I + w]], dim=1).contiguous()
            sliced[label] = _HFExperts(gu, down[:, :, :w].contiguous())
    for T in batches:
        sets = routing_sets(E, H, k, T, N_SETS, seed=T)
        cfg = lookup_config(E, H, I, k, DTYPE, DEV, T)
        row = {"shape": name, **spec, "batch": T, "config": cfg.to_dict(), "impls": {}}
        t0 = time.time()
        full_work = work(sets, None, H, I)

        def record(impl, ms, wk, extra=None):
            wb, ab, fl = wk
            row["impls"][impl] = {"us": ms * 1e3, "GBps": (wb + ab) / (ms * 1e-3) / 1e9,
                                  "TFLOPs": fl / (ms * 1e-3) / 1e12, "weight_MB": wb / 1e6, **(extra or {})}

        for label, widths, kp in variants:
            fn = lambda x, ids, tw, widths=widths: triton_forward(x, ids, tw, experts, widths)  # noqa: E731
            extra = {"keep": float(widths.float().mean() / I)}
            if check:
                x, ids, tw = sets[0]
                out = fn(x, ids, tw)
                ref = moe_experts_reference(x.float(), ids, tw.float(), ExpertWeights(gate_up32, down32), widths)
                extra["rel_err"] = rel_err(out, ref)
            record(f"flexc_{label}", bench_graph(fn, sets, rep_ms), work(sets, widths, H, I), extra)
        record("grouped_mm", bench_graph(lambda x, ids, tw: grouped_mm_experts_forward(hf, x, ids, tw), sets, rep_ms),
               full_work)
        for label, mod in sliced.items():
            wk = work(sets, uniform_widths(float(label[4:]), E, I), H, I)
            record(f"grouped_mm_sliced_{label}",
                   bench_graph(lambda x, ids, tw, mod=mod: grouped_mm_experts_forward(mod, x, ids, tw), sets, rep_ms), wk)
        if T * k * 2 * I * H * 2 <= 2e9:
            record("batched_mm", bench_graph(lambda x, ids, tw: batched_mm_experts_forward(hf, x, ids, tw), sets,
                                             rep_ms), full_work)
        if T <= 16:
            record("reference", bench_eager(lambda x, ids, tw: moe_experts_reference(x, ids, tw, experts), sets,
                                            rep_ms), full_work)
        results.append(row)
        im = row["impls"]
        log(f"  {name} T={T:5d} [{cfg.path}, bm={cfg.block_m}] grouped_mm {im['grouped_mm']['us']:8.1f} us | flexc "
            + " ".join(f"{lab}={im[f'flexc_{lab}']['us']:.1f}" for lab, _, _ in variants)
            + f" us | keep1 {im['flexc_keep1']['GBps']:.0f} GB/s {im['flexc_keep1']['TFLOPs']:.1f} TFLOP/s"
            + (f" | err {max(im[f'flexc_{lab}'].get('rel_err', 0) for lab, _, _ in variants):.1e}" if check else "")
            + f" ({time.time() - t0:.1f}s)")
    del gate_up, down, gate_up32, down32, sliced
    torch.cuda.empty_cache()


def goals(results, copy_gbps):
    """The issue's targets, evaluated on this run."""
    out = {}
    for name in {r["shape"] for r in results}:
        rows = sorted((r for r in results if r["shape"] == name), key=lambda r: r["batch"])
        slower = [(r["batch"], round(r["impls"]["flexc_keep1"]["us"] / r["impls"]["grouped_mm"]["us"], 3))
                  for r in rows if r["impls"]["flexc_keep1"]["us"] > r["impls"]["grouped_mm"]["us"]]
        decode = [(r["batch"], round(r["impls"]["flexc_keep0.5"]["us"] / r["impls"]["flexc_keep1"]["us"], 3))
                  for r in rows if r["batch"] <= 16 and "flexc_keep0.5" in r["impls"]]
        b1 = [r for r in rows if r["batch"] == 1]
        entry = {
            "keep1_not_slower_than_grouped_mm": not slower,
            "keep1_slower_at (batch, flexc/grouped_mm)": slower,
            "keep0.5_over_keep1_decode (batch, ratio)": decode,
            "keep0.5_decode_le_0.6": all(x <= 0.6 for _, x in decode),
        }
        if b1:
            frac = b1[0]["impls"]["flexc_keep1"]["GBps"] / copy_gbps
            entry["batch1_fraction_of_copy_bw"] = round(frac, 3)
            entry["batch1_ge_60pct_copy_bw"] = frac >= 0.6
        out[name] = entry
    return out


def print_table(results, copy_gbps, keeps, with_mix):
    labels = [f"keep{k:g}" for k in keeps] + (["mix0.5"] if with_mix else [])
    head = (f"{'shape':15s} {'T':>5s} {'grouped_mm':>10s} " + " ".join(f"{lab:>9s}" for lab in labels)
            + f" {'x gmm':>6s} {'GB/s':>6s} {'%copy':>6s} {'TFLOP/s':>7s} {'ref':>9s}")
    log("\ntimes in us (flexc columns = flexc kernels at that keep; x gmm = grouped_mm / flexc keep1)")
    log(head)
    log("-" * len(head))
    for r in results:
        im = r["impls"]
        k1 = im["flexc_keep1"]
        ref = im.get("reference", {}).get("us")
        log(f"{r['shape']:15s} {r['batch']:5d} {im['grouped_mm']['us']:10.1f} "
            + " ".join(f"{im[f'flexc_{lab}']['us']:9.1f}" for lab in labels)
            + f" {im['grouped_mm']['us'] / k1['us']:6.2f} {k1['GBps']:6.0f} {100 * k1['GBps'] / copy_gbps:5.0f}%"
            + f" {k1['TFLOPs']:7.1f} {ref if ref is None else round(ref, 1)!s:>9s}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("kernel_bench.json"))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--keeps", default=",".join(map(str, KEEPS)))
    ap.add_argument("--no-mix", action="store_true", help="skip the random per-expert width mix")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check against the reference op")
    ap.add_argument("--tune", action="store_true", help="autotune block configs on this GPU first")
    ap.add_argument("--tune-out", type=Path, default=None, help="write the tuned config table here")
    ap.add_argument("--rep-ms", type=int, default=50)
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global DEV, SMOKE, DTYPE
    if args.smoke:  # check this script without a GPU: tiny shape, interpreter, wall-clock times
        os.environ["TRITON_INTERPRET"] = "1"
        DEV, SMOKE, DTYPE = "cpu", True, torch.float32
        args.shapes = "tiny"
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/expert_kernels.py needs a CUDA GPU")

    import triton

    from flexc.kernels import tuning

    shapes = {s: {**SHAPES, **SMOKE_SHAPES}[s] for s in args.shapes.split(",") if s}
    batches = [int(b) for b in args.batches.split(",")]
    keeps = [float(k) for k in args.keeps.split(",")]
    if 1.0 not in keeps:
        keeps = [1.0, *keeps]
    dev = torch.cuda.get_device_name() if not SMOKE else "cpu (smoke test)"
    info = {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(),
            "sms": torch.cuda.get_device_properties(0).multi_processor_count if not SMOKE else 0}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    log(f"device: {dev}  torch {torch.__version__}  triton {triton.__version__}  {info.get('transformers', '')}")
    info["copy_GBps"] = measure_copy_bandwidth() if not SMOKE else 1.0
    info["matmul_bf16_TFLOPs"] = measure_matmul_tflops() if not SMOKE else 1.0
    log(f"measured copy bandwidth {info['copy_GBps']:.0f} GB/s (read+write), bf16 matmul {info['matmul_bf16_TFLOPs']:.0f} TFLOP/s")

    if args.tune:
        tuned = {}
        for name, s in shapes.items():
            t0 = time.time()
            key = tuning.shape_key(s["E"], s["H"], s["I"], s["k"], torch.bfloat16)
            tuned[key] = tuning.autotune(s["E"], s["H"], s["I"], s["k"], torch.bfloat16, "cuda",
                                         batches=batches, verbose=True)
            log(f"tuned {name} in {time.time() - t0:.0f}s")
            if args.tune_out:
                tuning.write_table(args.tune_out, dev, tuned, meta={"tuned_with": info})

    results: list[dict] = []
    payload = {"info": info, "batches": batches, "keeps": keeps, "granule": GRANULE, "results": results}
    for name, s in shapes.items():
        log(f"\n== {name}: E={s['E']} H={s['H']} I={s['I']} top-{s['k']} bf16")
        run_shape(name, s, batches, keeps, not args.no_mix, args.rep_ms, results, check=not args.no_check)
        payload["goals"] = goals(results, info["copy_GBps"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1))
    print_table(results, info["copy_GBps"], keeps, not args.no_mix)
    log("\ngoals: " + json.dumps(payload["goals"], indent=1))
    log(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
