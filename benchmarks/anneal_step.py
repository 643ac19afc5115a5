"""The two pieces of an anneal step that flexc writes itself, against plain autograd.

- One MoE layer's experts under a channel mask, forward and backward:
  :func:`flexc.passes.masked_experts.masked_experts_reference` (autograd over full-width GEMMs)
  against :func:`~flexc.passes.masked_experts.masked_experts` at pairs of widths (the widest
  allowed action ``U``, the sampled width ``S``; every expert alike).
- The distillation loss on one batch's logits, forward and backward: autograd through
  log-softmax and the top-k gather (:func:`flexc.passes.distill.distill_kl`) against
  :func:`~flexc.passes.distill.distill_loss` with its gradient written out.

Shapes of ``small`` and its anneal: 1,024 tokens (8 × 128), E=16, H=I=256, top-4, vocabulary
8,192, teacher top-64. Fastest and median of ``--repeats`` runs, the two sides interleaved.

    python benchmarks/anneal_step.py --out benchmarks/results/anneal_step.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from flexc.ir.layout import ExpertLayout, ExpertWeights  # noqa: E402
from flexc.passes.distill import TeacherTargets, distill_kl, distill_loss  # noqa: E402
from flexc.passes.masked_experts import masked_experts, masked_experts_reference  # noqa: E402

TOKENS, HIDDEN, INTER, EXPERTS, TOP_K, VOCAB, TEACHER_K = 1024, 256, 256, 16, 4, 8192, 64
WIDTHS = [(256, 256), (256, 192), (192, 128), (128, 64)]  # (U, S)


def side_by_side(first, second, repeats: int) -> tuple[list[float], list[float]]:
    """Milliseconds of each call, the two interleaved (after one warm-up call each)."""
    first(), second()
    times = ([], [])
    for _ in range(repeats):
        for fn, out in zip((first, second), times):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1000)
    return times


def summary(ms: list[float]) -> tuple[float, float]:
    ms = sorted(ms)
    return round(ms[0], 1), round(ms[len(ms) // 2], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g, requires_grad=True)
    weights, ids = torch.softmax(torch.randn(TOKENS, EXPERTS, generator=g), -1).topk(TOP_K, -1)
    gate_up = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g) * 0.05
    down = torch.randn(EXPERTS, HIDDEN, INTER, generator=g) * 0.05
    layout = ExpertLayout()
    rows = []
    for upper, sampled in WIDTHS:
        mask = torch.zeros(EXPERTS, INTER)
        mask[:, :sampled] = 1
        mask.requires_grad_(True)
        experts = ExpertWeights(gate_up, down, layout=layout)
        reference, written = side_by_side(
            lambda: masked_experts_reference(hidden, ids, weights, experts, mask).sum().backward(),
            lambda: masked_experts(hidden, ids, weights, experts, mask, [upper] * EXPERTS,
                                   [sampled] * EXPERTS).sum().backward(), args.repeats)
        rows.append({"piece": f"experts U={upper} S={sampled}", "autograd_min_ms": summary(reference)[0],
                     "autograd_median_ms": summary(reference)[1], "flexc_min_ms": summary(written)[0],
                     "flexc_median_ms": summary(written)[1]})
    logits = torch.randn(8, TOKENS // 8, VOCAB, generator=g) * 2
    teacher = TeacherTargets.from_logits(torch.randn(8, TOKENS // 8, VOCAB, generator=g) * 2, TEACHER_K)

    def loss_backward(fn):
        z = logits.clone().requires_grad_(True)
        fn(z).backward()

    reference, written = side_by_side(lambda: loss_backward(lambda z: distill_kl(F.log_softmax(z, dim=-1), teacher)),
                                      lambda: loss_backward(lambda z: distill_loss(z, teacher)), args.repeats)
    rows.append({"piece": "distillation loss", "autograd_min_ms": summary(reference)[0],
                 "autograd_median_ms": summary(reference)[1], "flexc_min_ms": summary(written)[0],
                 "flexc_median_ms": summary(written)[1]})
    print("\nAn anneal step's pieces, forward + backward (ms): plain autograd against flexc's")
    common.print_table(rows, list(rows[0]))
    common.write_json(args.out or common.RESULTS / "anneal_step.json", {"repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
