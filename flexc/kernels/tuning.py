"""Block configurations for the expert kernels: a shipped table, a lookup, and an autotuner.

Keys: ``(E, H, I, top_k, dtype)`` -> device name -> batch bucket (number of tokens, a power of
two) -> :class:`~flexc.kernels.triton_experts.KernelConfig` as a dict. Tables live in
``flexc/kernels/configs/*.json`` (package data)::

    {"format": 1,
     "device": "NVIDIA H100 80GB HBM3",
     "entries": {"E=128,H=2048,I=768,k=8,dtype=bfloat16": {"1": {...}, "2": {...}, ...}}}

Lookup order: configurations tuned in this process (:func:`autotune`, :func:`register_configs`),
then the shipped tables for the exact device name, then :func:`default_config`'s heuristics.
A token count between buckets uses the next bucket up (the largest one past the last).

Importing this module imports Triton (through the kernel module); timing needs a CUDA GPU.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from flexc.kernels.triton_experts import KernelConfig, default_config

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
TABLE_FORMAT = 1

# shape key -> device name -> bucket -> config
_Table = dict[str, dict[str, dict[int, KernelConfig]]]
_RUNTIME: _Table = {}


def shape_key(num_experts: int, hidden: int, intermediate: int, top_k: int, dtype: torch.dtype | str) -> str:
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    return f"E={num_experts},H={hidden},I={intermediate},k={top_k},dtype={name}"


def batch_bucket(num_tokens: int) -> int:
    for b in BUCKETS:
        if num_tokens <= b:
            return b
    return BUCKETS[-1]


@functools.cache
def device_name(device: torch.device | str | None = None) -> str:
    """Name a device the way tables are keyed ("cpu" for CPUs)."""
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


@functools.cache
def _shipped() -> _Table:
    table: _Table = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:  # a broken table must not break the kernels
            log.warning("ignoring kernel config table %s: %s", path, exc)
            continue
        _merge(table, data)
    return table


def _merge(table: _Table, data: dict) -> None:
    if data.get("format") != TABLE_FORMAT:
        raise ValueError(f"unsupported kernel config table format {data.get('format')!r}")
    dev = data["device"]
    for key, buckets in data["entries"].items():
        per_dev = table.setdefault(key, {}).setdefault(dev, {})
        for b, cfg in buckets.items():
            per_dev[int(b)] = KernelConfig.from_dict(cfg)


def load_table(path: str | Path) -> None:
    """Add a table file's entries to this process's lookups (they take precedence)."""
    _merge(_RUNTIME, json.loads(Path(path).read_text()))
    _cached_lookup.cache_clear()


def register_configs(key: str, device: str, configs: dict[int, KernelConfig]) -> None:
    _RUNTIME.setdefault(key, {}).setdefault(device, {}).update(configs)
    _cached_lookup.cache_clear()


def table_entries(key: str, device: str) -> dict[int, KernelConfig]:
    """The configs known for one shape on one device, runtime ones over shipped ones."""
    merged = dict(_shipped().get(key, {}).get(device, {}))
    merged.update(_RUNTIME.get(key, {}).get(device, {}))
    return merged


def _pick(entries: dict[int, KernelConfig], bucket: int) -> KernelConfig | None:
    if not entries:
        return None
    ups = [b for b in entries if b >= bucket]
    return entries[min(ups)] if ups else entries[max(entries)]


@functools.lru_cache(maxsize=4096)
def _cached_lookup(key: str, device: str, bucket: int, num_experts: int, top_k: int, interpret: bool) -> KernelConfig:
    cfg = None if interpret else _pick(table_entries(key, device), bucket)
    return cfg if cfg is not None else default_config(num_experts, top_k, bucket, interpret=interpret)


def lookup_config(num_experts: int, hidden: int, intermediate: int, top_k: int, dtype: torch.dtype,
                  device: torch.device | str, num_tokens: int) -> KernelConfig:
    device = torch.device(device)
    key = shape_key(num_experts, hidden, intermediate, top_k, dtype)
    return _cached_lookup(key, device_name(device), batch_bucket(num_tokens), num_experts, top_k,
                          device.type != "cuda")


def write_table(path: str | Path, device: str, entries: dict[str, dict[int, KernelConfig]],
                meta: dict | None = None) -> Path:
    data = {"format": TABLE_FORMAT, "device": device, **({"meta": meta} if meta else {}),
            "entries": {k: {str(b): c.to_dict() for b, c in sorted(v.items())} for k, v in entries.items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Autotuning (needs a CUDA GPU)

def _with_tma(variants: list[dict], flag: str) -> list[dict]:
    return [*({**v, flag: False} for v in variants), *({**v, flag: True} for v in variants)]


def _grouped_candidates(per_expert: float) -> list[tuple[int, list[dict], list[dict]]]:
    """(block_m, gate/up variants, down variants) worth timing for ``per_expert`` rows per expert."""
    small = [dict(block_n1=64, block_k1=128, warps1=4, stages1=4), dict(block_n1=32, block_k1=256, warps1=4, stages1=3),
             dict(block_n1=128, block_k1=128, warps1=4, stages1=3), dict(block_n1=64, block_k1=256, warps1=4, stages1=3)]
    small_d = [dict(block_n2=64, block_k2=128, warps2=4, stages2=4), dict(block_n2=32, block_k2=256, warps2=4, stages2=3),
               dict(block_n2=128, block_k2=128, warps2=4, stages2=3), dict(block_n2=64, block_k2=256, warps2=4, stages2=3)]
    mid = [dict(block_n1=64, block_k1=64, warps1=4, stages1=4), dict(block_n1=128, block_k1=64, warps1=4, stages1=4),
           dict(block_n1=128, block_k1=64, warps1=8, stages1=3), dict(block_n1=64, block_k1=128, warps1=4, stages1=3)]
    mid_d = [dict(block_n2=64, block_k2=64, warps2=4, stages2=4), dict(block_n2=128, block_k2=64, warps2=4, stages2=4),
             dict(block_n2=128, block_k2=64, warps2=8, stages2=4), dict(block_n2=256, block_k2=64, warps2=8, stages2=3)]
    big = [dict(block_n1=128, block_k1=64, warps1=8, stages1=3), dict(block_n1=128, block_k1=64, warps1=8, stages1=4),
           dict(block_n1=64, block_k1=64, warps1=4, stages1=4), dict(block_n1=128, block_k1=32, warps1=8, stages1=5)]
    big_d = [dict(block_n2=128, block_k2=64, warps2=8, stages2=4), dict(block_n2=256, block_k2=64, warps2=8, stages2=3),
             dict(block_n2=128, block_k2=64, warps2=4, stages2=4), dict(block_n2=128, block_k2=128, warps2=8, stages2=3)]
    out = []
    if per_expert <= 24:
        out.append((16, _with_tma(small, "tma1"), _with_tma(small_d, "tma2")))
    if 4 < per_expert <= 96:
        out.append((32 if per_expert <= 24 else 64, _with_tma(mid, "tma1"), _with_tma(mid_d, "tma2")))
    if per_expert > 96:
        out.append((64, _with_tma(mid, "tma1"), _with_tma(mid_d, "tma2")))
    if per_expert > 48:
        out.append((128, _with_tma(big, "tma1"), _with_tma(big_d, "tma2")))
    return out


_GEMV_UP = [
    dict(gv_block_n1=16, gv_block_k1=256, gv_warps1=4),
    dict(gv_block_n1=8, gv_block_k1=512, gv_warps1=4),
    dict(gv_block_n1=4, gv_block_k1=1024, gv_warps1=4),
    dict(gv_block_n1=8, gv_block_k1=256, gv_warps1=2),
    dict(gv_block_n1=16, gv_block_k1=512, gv_warps1=8),
    dict(gv_block_n1=32, gv_block_k1=128, gv_warps1=4),
]
_GEMV_DOWN = [
    dict(gv_block_n2=16, gv_block_k2=256, gv_warps2=4, split_slots=True),
    dict(gv_block_n2=8, gv_block_k2=512, gv_warps2=4, split_slots=True),
    dict(gv_block_n2=4, gv_block_k2=1024, gv_warps2=4, split_slots=True),
    dict(gv_block_n2=8, gv_block_k2=256, gv_warps2=2, split_slots=True),
    dict(gv_block_n2=16, gv_block_k2=256, gv_warps2=4, split_slots=False),
    dict(gv_block_n2=8, gv_block_k2=256, gv_warps2=4, split_slots=False),
    dict(gv_block_n2=4, gv_block_k2=512, gv_warps2=4, split_slots=False),
    dict(gv_block_n2=4, gv_block_k2=1024, gv_warps2=4, split_slots=False),
]


def make_inputs(num_experts: int, hidden: int, intermediate: int, top_k: int, num_tokens: int,
                dtype: torch.dtype, device, seed: int = 0, weights=None):
    """Random activations, routing and (unless given) weights for timing."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, hidden, device=device, dtype=dtype, generator=g)
    logits = torch.randn(num_tokens, num_experts, device=device, generator=g)
    tw, ids = logits.softmax(-1).topk(top_k, dim=-1)
    if weights is None:
        gate_up = torch.randn(num_experts, 2 * intermediate, hidden, device=device, dtype=dtype, generator=g)
        gate_up.mul_(hidden ** -0.5)
        down = torch.randn(num_experts, hidden, intermediate, device=device, dtype=dtype, generator=g)
        down.mul_(intermediate ** -0.5)
        weights = (gate_up, down)
    return x, ids, tw.to(dtype), weights


def time_fn(fn: Callable[[], object], graph: bool = True, rep_ms: int = 60) -> float:
    """Median milliseconds of ``fn`` (replayed as a CUDA graph when ``graph``)."""
    import triton.testing

    if graph:
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
        except Exception as exc:  # noqa: BLE001 -- fall back to eager timing
            log.warning("CUDA-graph timing failed (%s); timing eagerly", exc)
    return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))


def autotune(num_experts: int, hidden: int, intermediate: int, top_k: int, dtype: torch.dtype = torch.bfloat16,
             device: torch.device | str = "cuda", batches: Iterable[int] = BUCKETS, weights=None,
             register: bool = True, verbose: bool = False, decode_tokens: int = 16) -> dict[int, KernelConfig]:
    """Time candidate configurations on this GPU; returns (and registers) the best per bucket.

    Per bucket: the gemv path (small batches; gate/up variants first, then down variants) and
    the grouped path with one or two row-block sizes (gate/up variants with the heuristic down
    config, then down variants with the best gate/up one), each with and without tensor
    descriptors. Random routing. The objective is the time at full width, plus, for decode
    buckets (``<= decode_tokens``), the time at half width: a nested family serves every
    budget from one config table, and decode is where widths pay most.
    """
    from flexc.kernels.triton_experts import moe_forward

    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError("autotune needs a CUDA device")
    key = shape_key(num_experts, hidden, intermediate, top_k, dtype)
    best_per_bucket: dict[int, KernelConfig] = {}
    compiled: set[KernelConfig] = set()
    half = torch.full((num_experts,), max(16, (intermediate // 2) // 16 * 16), dtype=torch.int32, device=device)
    for T in batches:
        x, ids, tw, weights = make_inputs(num_experts, hidden, intermediate, top_k, T, dtype, device, weights=weights)
        gate_up, down = weights
        width_sets = [None, half] if T <= decode_tokens else [None]

        def timed(cfg: KernelConfig) -> float:
            total = 0.0
            try:
                for widths in width_sets:
                    fn = lambda widths=widths: moe_forward(x, ids, tw, gate_up, down, widths=widths, config=cfg)  # noqa: E731
                    if cfg not in compiled:
                        fn()
                        torch.cuda.synchronize()
                    total += time_fn(fn, rep_ms=25)
                compiled.add(cfg)
                return total
            except Exception as exc:  # noqa: BLE001 -- e.g. out of shared memory: skip the candidate
                if verbose:
                    print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:160]}")
                return float("inf")

        t0 = time.time()
        results: list[tuple[float, KernelConfig]] = []
        pairs = T * top_k
        if pairs <= 256:
            base = default_config(num_experts, top_k, 1).replace(path="gemv")
            best_up = min(((timed(base.replace(**v)), base.replace(**v)) for v in _GEMV_UP), key=lambda r: r[0])
            results.append(best_up)
            for v in _GEMV_DOWN:
                cfg = best_up[1].replace(**v)
                results.append((timed(cfg), cfg))
        per_expert = pairs / num_experts
        for bm, gu_variants, d_variants in _grouped_candidates(per_expert):
            base = default_config(num_experts, top_k, T).replace(path="grouped", block_m=bm)
            base = base.replace(group_m=1 if bm == 16 else 8)
            best_gu = min(((timed(base.replace(**v)), base.replace(**v)) for v in gu_variants), key=lambda r: r[0])
            results.append(best_gu)
            for v in d_variants:
                cfg = best_gu[1].replace(**v)
                results.append((timed(cfg), cfg))
        t_best, cfg_best = min(results, key=lambda r: r[0])
        best_per_bucket[T] = cfg_best
        if verbose:
            print(f"[tune] {key} T={T}: {t_best * 1e3:.1f} us (sum over {len(width_sets)} width sets) "
                  f"{cfg_best.path}{' tma' * (cfg_best.tma1 or cfg_best.tma2)} ({len(results)} timed, {time.time() - t0:.1f}s)",
                  flush=True)
    if register:
        register_configs(key, device_name(device), best_per_bucket)
    return best_per_bucket


__all__ = [
    "BUCKETS", "CONFIG_DIR", "autotune", "batch_bucket", "device_name", "load_table", "lookup_config",
    "make_inputs", "register_configs", "shape_key", "table_entries", "time_fn", "write_table",
]
