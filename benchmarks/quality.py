"""Held-out perplexity of every method at keep 0.9 … 0.2 on a zoo model (CPU).

Methods: learned nested widths (flexmoe: rank_channels, insert_action_gates, anneal), uniform
widths, coverage widths, and whole-expert pruning (MAN and frequency criteria), all on the
same ranked model, calibration set, budgets (fractions of routed-expert parameters) and
held-out tokens. Runs :func:`flexc.compiler.compare.compare` on a spec built from the arguments.

    python benchmarks/quality.py --model tiny
    python benchmarks/quality.py --model small --samples 64 --eval-tokens 30000
    python benchmarks/quality.py --model mixtral-tiny --eval-tokens 20000
    python benchmarks/quality.py --model tiny --methods flexmoe,coverage --seeds 0,1,2
    python benchmarks/quality.py --model tiny --max-buckets none --grid none   # widths without the serving bound
    python benchmarks/quality.py --model tiny --methods flexmoe,coverage --grid 32 --quantize w4a16:gptq:32,w4a16:rtn:32
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from flexc.compiler.spec import Spec  # noqa: E402
from flexc.compiler.compare import compare, parse_quantize  # noqa: E402
from flexc.passes.methods import parse_methods  # noqa: E402

BUDGETS = "0.9,0.75,0.6,0.5,0.4,0.3,0.25,0.2"
METHODS = "flexmoe,uniform,coverage,expert_prune:man,expert_prune:frequency,expert_prune:reap"


def spec_for(args, seed: int) -> Spec:
    import flexc.zoo

    recipe = json.loads((flexc.zoo.resolve(args.model) / "manifest.json").read_text())["recipe"]
    seq_len, corpus = recipe["seq_len"], recipe.get("corpus", "python-stdlib")
    budgets = [float(b) for b in args.budgets.split(",")]
    return Spec.model_validate({
        "model": {"zoo": args.model, "dtype": "float32"},
        "data": {
            "calibration": {"builtin": corpus, "split": "train", "num_samples": args.samples,
                            "seq_len": seq_len, "batch_size": 8},
            "evaluation": {"builtin": corpus, "split": "heldout", "seq_len": seq_len, "batch_size": 16,
                           "num_samples": args.eval_tokens // seq_len},
        },
        "budgets": {"keep": budgets, "metric": "params", "grid": args.grid, "max_buckets": args.max_buckets},
        "pipeline": [
            {"rank_channels": {"score": "taylor", "plot": False}},
            {"insert_action_gates": {"levels": args.levels, "granule": 16, "init_margin": args.init_margin}},
            {"anneal": {**{k: v for k, v in (("steps", args.steps), ("lr", args.lr)) if v is not None},
                        **dict(args.anneal)}},
        ],
        "seed": seed,
    })


def _bound(text: str) -> int | None:
    return None if text.lower() in ("none", "null") else int(text)


def _grid(text: str) -> int | str | None:
    return text if text == "auto" else _bound(text)


def _option(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, found {text!r}")
    return key, yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="zoo model (tiny; small once it is built)")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--budgets", default=BUDGETS)
    parser.add_argument("--samples", type=int, default=64, help="calibration sequences")
    parser.add_argument("--steps", type=int, default=None, help="anneal steps (default: the pass's)")
    parser.add_argument("--lr", type=float, default=None, help="anneal learning rate (default: the pass's)")
    parser.add_argument("--init-margin", type=float, default=3.0, help="insert_action_gates' full-width bias")
    parser.add_argument("--levels", type=int, default=None, help="insert_action_gates' widths per expert (default: the pass's)")
    parser.add_argument("--anneal", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="another anneal option, VALUE in YAML (e.g. schedule=ramp, 'schedule={start_margin: 1}')")
    parser.add_argument("--max-buckets", type=_bound, default=4, metavar="N|none",
                        help="budgets.max_buckets: distinct widths per layer (default 4, the spec's; none: unbounded)")
    parser.add_argument("--grid", type=_grid, default="auto", metavar="N|auto|none",
                        help="budgets.grid (default auto, the spec's; none: the pass's granule)")
    parser.add_argument("--recover", action="store_true",
                        help="also every method after one recover (defaults, at the budget nearest keep 0.6)")
    parser.add_argument("--quantize", default=None, metavar="SCHEME[:METHOD[:GROUP]],...",
                        help="also every method after quantize (e.g. w4a16:gptq:32,w4a16:rtn:32; needs --grid a "
                             "multiple of the group size)")
    parser.add_argument("--adaptive", action="store_true",
                        help="also every method (and its recover) with a token-adaptive width policy (adaptive_widths' "
                             "defaults); rows METHOD+adaptive carry the realised active keep beside the static table's")
    parser.add_argument("--eval-tokens", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default=None, metavar="S,S,...",
                        help="run every method at each seed (calibration sample, Gumbel noise) and also report "
                             "the mean perplexity per method and budget")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (the plot goes beside it)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (perplexities do not depend on it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    out = args.out or common.RESULTS / f"quality_{args.model}.json"
    runs = {}
    for seed in seeds:
        spec = spec_for(args, seed)
        work = Path(tempfile.mkdtemp(prefix="flexc-quality-"))
        quantize = parse_quantize(args.quantize, spec) if args.quantize else []
        runs[seed] = compare(spec, parse_methods(args.methods, spec), work, quiet=True, recover=args.recover,
                             quantize=quantize, adaptive=args.adaptive)
        print(f"seed {seed}\n" + (work / "compare.md").read_text())
        common.print_table(runs[seed]["results"], ["method", "keep_target", "params_keep", "ppl", "tokens"])
        if seed == seeds[0]:
            shutil.copy(work / "compare.png", out.with_suffix(".png"))
    result = {"model": args.model, "args": vars(args) | {"out": str(out)}, **runs[seeds[0]]}
    if len(seeds) > 1:
        result["seeds"] = {str(s): r["results"] for s, r in runs.items()}
        result["mean_over_seeds"] = mean_rows([r["results"] for r in runs.values()])
        print(f"mean held-out perplexity over seeds {seeds}")
        common.print_table(result["mean_over_seeds"], ["method", "keep_target", "ppl", "ppl_min", "ppl_max"])
    if any(r["held_out_check"] for r in runs.values()):
        result["held_out_check_by_seed"] = {str(s): r["held_out_check"] for s, r in runs.items()}
        result["held_out_check_summary"] = check_summary(runs)
        print("the anneal's held-out check (calibration documents) against the evaluation text, over seeds")
        common.print_table(result["held_out_check_summary"], ["method", "keep_target", "checked", "chose_best",
                                                              "mean_regret", "worst_regret", "same_sign_loss",
                                                              "same_sign_next_token"])
    if args.adaptive:
        result["adaptive_increase_ratios"] = increase_ratios(runs)
        print("adaptive policy's perplexity increase over unpruned / its static table's, per seed")
        common.print_table(result["adaptive_increase_ratios"], ["method", "keep_target", "mean", "worst",
                                                                "active_keep", "static_active_keep"])
    common.write_json(out, result)
    print(f"wrote {out} and {out.with_suffix('.png')} (seed {seeds[0]})")


def check_summary(runs: dict[int, dict]) -> list[dict]:
    """Per learned method and budget, over the seeds whose held-out check ran: how often it chose the candidate
    the evaluation text scores best, the chosen table's perplexity over that best one (mean, worst), and how
    often the trained − fallback difference of the check's ranking loss, and of its next-token loss, had the sign
    of the evaluation text's next-token loss difference."""
    by_key: dict[tuple, list[dict]] = {}
    for run in runs.values():
        for method, rows in run["held_out_check"].items():
            for r in rows:
                by_key.setdefault((method, r["keep_target"]), []).append(r)
    out = []
    for (method, keep), rows in by_key.items():
        signed = [r["agree"] for r in rows if "agree" in r]
        out.append({"method": method, "keep_target": keep, "checked": len(rows),
                    "chose_best": sum(r["chosen"] == r["best"] for r in rows),
                    "mean_regret": sum(r["regret"] for r in rows) / len(rows),
                    "worst_regret": max(r["regret"] for r in rows),
                    **{f"same_sign_{key}": f"{sum(a[key] for a in signed)}/{len(signed)}"
                       for key in ("loss", "next_token")}})
    return out


def increase_ratios(runs: dict[int, dict]) -> list[dict]:
    """Per ``METHOD+adaptive`` row and budget: the policy's perplexity increase over unpruned divided by its static
    table's (``METHOD`` at the same keep target), in each seed; mean and worst (largest) over seeds, with the
    mean realised active keeps of both on the evaluation text; each seed's ratio and what its policy ran."""
    ratios: dict[tuple, list[dict]] = {}
    for run in runs.values():
        rows = run["results"]
        unpruned = next(r["ppl"] for r in rows if r["method"] == "unpruned")
        static = {(r["method"], r["keep_target"]): r["ppl"] for r in rows}
        for r in rows:
            method = r["method"]
            if not method.endswith("+adaptive"):
                continue
            base = static[(method[:-len("+adaptive")], r["keep_target"])]
            ratio = (r["ppl"] - unpruned) / (base - unpruned) if base > unpruned else None
            ratios.setdefault((method, r["keep_target"]), []).append({**r, "ratio": ratio})
    out = []
    for (method, keep), rows in ratios.items():
        values = [r["ratio"] for r in rows if r["ratio"] is not None]
        out.append({"method": method, "keep_target": keep, "seeds": len(rows),
                    "mean": sum(values) / len(values) if values else None, "worst": max(values) if values else None,
                    "active_keep": sum(r["active_keep"] for r in rows) / len(rows),
                    "static_active_keep": sum(r["static_active_keep"] for r in rows) / len(rows),
                    "ratios": [r["ratio"] for r in rows], "policies": [r.get("policy") for r in rows]})
    return out


def mean_rows(runs: list[list[dict]]) -> list[dict]:
    """Per (method, keep target): mean, min and max perplexity over the runs (and mean realised active keeps,
    for adaptive rows)."""
    by_key: dict[tuple, list[dict]] = {}
    for rows in runs:
        for r in rows:
            by_key.setdefault((r["method"], r["keep_target"]), []).append(r)
    out = []
    for (m, k), rows in by_key.items():
        v = [r["ppl"] for r in rows]
        row = {"method": m, "keep_target": k, "ppl": sum(v) / len(v), "ppl_min": min(v), "ppl_max": max(v),
               "seeds": len(v)}
        for key in ("active_keep", "static_active_keep"):
            if all(key in r for r in rows):
                row[key] = sum(r[key] for r in rows) / len(rows)
        out.append(row)
    return out


if __name__ == "__main__":
    main()
