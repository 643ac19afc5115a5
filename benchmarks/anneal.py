"""What the anneal costs and what it buys, against the release before the tracking schedule.

Ranks channels (Taylor), inserts action gates and anneals once for every budget on a zoo
model, then reports the anneal's wall time, steps per second, time per budget and peak memory,
and held-out perplexity of each exported table next to the coverage and uniform baselines on
the same ranked model.

``--baseline-rev REV`` also runs this script's counterpart at git revision REV (unpacked to a
temporary folder, run in a subprocess with its own ``flexc`` on the path) on the same model,
samples and budgets, so the two anneals are timed side by side in one run on one machine.

    python benchmarks/anneal.py --model small --baseline-rev 9f8c810 --out benchmarks/results/anneal_small.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from flexc.passes import resolve_pass  # noqa: E402
from flexc.passes.width_tables import expert_weights, keep_ratio  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def run_baseline(rev: str, args) -> dict:
    """Run benchmarks/anneal.py as it was at ``rev`` (its own flexc) and return its JSON."""
    work = Path(tempfile.mkdtemp(prefix=f"flexc-{rev}-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
        tar.extractall(work, filter="data")
    out = work / "result.json"
    cmd = [sys.executable, str(work / "benchmarks" / "anneal.py"), "--model", args.model, "--budgets", args.budgets,
           "--samples", str(args.samples), "--steps", str(args.baseline_steps),
           "--eval-tokens", str(args.baseline_eval_tokens), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(work)}
    print(f"baseline: {rev} ({' '.join(cmd[1:])})", flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=work)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--budgets", default="0.75,0.5,0.35")
    parser.add_argument("--samples", type=int, default=128, help="calibration sequences")
    parser.add_argument("--steps", type=int, default=None, help="anneal steps (default: the pass's)")
    parser.add_argument("--eval-tokens", type=int, default=50_000)
    parser.add_argument("--baseline-rev", default=None, help="git revision to time side by side")
    parser.add_argument("--baseline-steps", type=int, default=200,
                        help="the baseline's anneal steps (200: that release's pass default)")
    parser.add_argument("--baseline-eval-tokens", type=int, default=2_000,
                        help="held-out tokens of the baseline run's own evaluation (its timing excludes it)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    budgets = [float(b) for b in args.budgets.split(",")]

    baseline = run_baseline(args.baseline_rev, args) if args.baseline_rev else None

    setup = common.gated_setup(args.model, args.samples, budgets, prefix="flexc-anneal-bench-")
    model, tokenizer, seq_len, graph, ctx, work = (setup.model, setup.tokenizer, setup.seq_len, setup.graph,
                                                   setup.ctx, setup.work)
    state = ctx.state.copy()  # ranking's hand-off, for the baselines below
    rss_before = common.peak_rss_mb()
    anneal_opts = {} if args.steps is None else {"steps": args.steps}
    start = time.perf_counter()
    resolve_pass("anneal")(anneal_opts)(graph, ctx)
    seconds = time.perf_counter() - start
    history = json.loads((work / "anneal_history.json").read_text())
    report = json.loads((work / "width_tables.json").read_text())
    learned = ctx.state.width_tables.tables

    def ppl():
        return common.heldout_ppl(model, tokenizer, seq_len, args.eval_tokens)

    baselines = {}
    for name in ("coverage", "uniform"):
        ctx.state = state.copy()
        ctx.workdir = work / name
        resolve_pass(name)({"granule": 16})(graph, ctx)
        baselines[name] = ctx.state.width_tables.tables

    full = torch.tensor([g.intermediate_size for g in graph.groups])
    weights = expert_weights(graph.groups, "params")
    graph.set_widths(None)
    rows = [{"keep_target": 1.0, "method": "unpruned", "keep": 1.0, "ppl": ppl()}]
    for i, (b, info) in enumerate(zip(budgets, report["budgets"])):
        for method, table in (("learned", learned[i]), *((n, t[i]) for n, t in baselines.items())):
            graph.set_widths(table)
            rows.append({"keep_target": b, "method": method, "keep": keep_ratio(table, full, weights), "ppl": ppl(),
                         "how": info["how"] if method == "learned" else "", "seconds": info.get("seconds", "")
                         if method == "learned" else ""})
    graph.set_widths(None)
    print(f"\nHeld-out perplexity, {args.model} zoo model: learned nested widths vs the baselines")
    common.print_table(rows, ["keep_target", "method", "keep", "ppl", "seconds", "how"])
    cost = {"seconds": seconds, "steps": len(history), "steps_per_second": len(history) / seconds,
            "weights_mb": common.weight_mb(model), "rss_before_anneal_mb": rss_before,
            "peak_rss_mb": common.peak_rss_mb(), "calibration_samples": args.samples, "seq_len": seq_len}
    print("\nanneal cost")
    common.print_table([cost], list(cost))
    result = {"model": args.model, "options": report.get("schedule"), "eval_tokens": args.eval_tokens,
              "results": rows, "cost": cost, "tables": report, "artifacts": str(work)}
    if baseline is not None:
        old = baseline["cost"]
        result["baseline"] = {"rev": args.baseline_rev, "cost": old, "results": baseline["results"],
                              "wall_time_ratio": seconds / old["seconds"]}
        print(f"\nside by side: anneal {seconds:.1f} s ({len(history)} steps) vs {old['seconds']:.1f} s "
              f"({old['steps']} steps) at {args.baseline_rev}: {seconds / old['seconds']:.2f}x the wall time")
    out = args.out or common.RESULTS / f"anneal_{args.model}.json"
    common.write_json(out, result)


if __name__ == "__main__":
    main()
