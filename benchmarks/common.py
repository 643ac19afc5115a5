"""Shared pieces of the CPU quality benchmarks: zoo model, calibration data, held-out perplexity."""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from flexc.data.calibration import CalibrationSet, LoadedCalibration
from flexc.passes import PassContext
from flexc.zoo.evaluate import evaluate_heldout

RESULTS = Path(__file__).parent / "results"


def zoo_model(name: str):
    """The zoo model ``name`` (built if needed) and its tokenizer, fp32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import flexc.zoo

    path = flexc.zoo.resolve(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path), json.loads((path / "manifest.json").read_text())


def calibration(tokenizer, num_samples: int, seq_len: int = 128, batch_size: int = 8, seed: int = 0):
    source = SimpleNamespace(builtin="python-stdlib", split="train", num_samples=num_samples, seq_len=seq_len,
                             batch_size=batch_size, text_field="text")
    # Loaded once, still able to read past itself: the anneal's held-out text (selection.samples).
    return LoadedCalibration(CalibrationSet(source, tokenizer, seed=seed))


def context(workdir: Path, tokenizer, data, budgets=(), metric="params", seed=0) -> PassContext:
    spec = SimpleNamespace(budgets=SimpleNamespace(keep_ratios=tuple(budgets), metric=metric))
    return PassContext(workdir=workdir, spec=spec, seed=seed, tokenizer=tokenizer, calibration_data=data,
                       logger=logging.getLogger("bench"), quiet=True)


def gated_setup(model_name: str, samples: int, budgets, prefix: str) -> SimpleNamespace:
    """A zoo model lowered, channel-ranked and gated, ready for ``anneal``: model, tokenizer,
    seq_len, graph, ctx (working in a fresh temporary directory ``work``)."""
    import tempfile

    from flexc.ir import lower
    from flexc.passes import resolve_pass

    model, tokenizer, manifest = zoo_model(model_name)
    seq_len = manifest["recipe"]["seq_len"]
    data = calibration(tokenizer, samples, seq_len=seq_len)
    graph = lower(model)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    ctx = context(work, tokenizer, data, budgets=budgets)
    resolve_pass("rank_channels")({"plot": False})(graph, ctx)
    resolve_pass("insert_action_gates")({})(graph, ctx)
    return SimpleNamespace(model=model, tokenizer=tokenizer, seq_len=seq_len, graph=graph, ctx=ctx, work=work)


def heldout_ppl(model, tokenizer, seq_len: int, max_tokens: int) -> float:
    with torch.no_grad():
        return evaluate_heldout(model, tokenizer, seq_len=seq_len, max_tokens=max_tokens).perplexity


def uniform_table(graph, keep: float) -> torch.Tensor:
    """The same width in every expert: keep * I rounded to the nearest channel."""
    return torch.stack([torch.full((g.num_experts,), round(keep * g.intermediate_size), dtype=torch.int32)
                        for g in graph.groups])


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> None:
    """Make the peak-RSS counter (VmHWM, ru_maxrss) restart from the current RSS (Linux ≥ 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_since_reset_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def weight_mb(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))
    sys.stdout.flush()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
