"""Token-adaptive widths from router confidence (MoSE-style) against static tables, at equal realised keep.

A study for issue 31's policy, on flexc's per-pair widths (the op takes ``widths [T, k]``): a
compile of a zoo model gives nested width tables at ``--budgets`` (``--method coverage`` or the
learned ``flexmoe``); its levels are the full width and those tables. For each target budget ``b``:

- **static**: the table of ``b``; its realised keep is the mean, over the held-out text's routed
  (token, slot) pairs, of the pair's expert width over the full width;
- **adaptive**: per MoE layer, a pair whose routing weight is at or above a threshold runs at an
  upper level, the others at a lower level; the threshold is the routing-weight quantile, on the
  calibration text, that gives the static table's realised keep there. Two rules: ``adjacent``
  (the budgets just above and below ``b``'s realised keep) and ``extreme`` (full width and the
  narrowest table).

Reported: held-out perplexity and realised keep of each, and the adaptive increase over unpruned
as a fraction of the static one (issue 31's target: at most 0.70).

    python benchmarks/adaptive_widths.py --model tiny --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, print_table, write_json  # noqa: E402


def compile_nested(model: str, method: str, budgets: list[float], seed: int, workdir: Path) -> Path:
    import flexc
    import flexc.zoo

    recipe = json.loads((flexc.zoo.resolve(model) / "manifest.json").read_text())["recipe"]
    corpus, seq_len = recipe.get("corpus", "python-stdlib"), recipe["seq_len"]
    out = workdir / f"{model}-{method}-seed{seed}"
    if (out / "nested" / "flexc_manifest.json").is_file():
        return out
    data = {"builtin": corpus, "num_samples": 64, "seq_len": seq_len, "batch_size": 8}
    width = [{"insert_action_gates": {}}, {"anneal": {}}] if method == "flexmoe" else [{"coverage": {}}]
    flexc.compile({"model": {"zoo": model, "dtype": "float32"}, "data": {"calibration": {**data, "split": "train"}},
                   "budgets": {"keep": budgets}, "pipeline": [{"rank_channels": {"plot": False}}, *width],
                   "export": {"formats": ["nested"]}, "seed": seed}, out=out, quiet=True, force=True)
    return out


class PairPolicy:
    """Per-pair widths for every MoE layer of a loaded nested model, through each experts module's op."""

    def __init__(self, model):
        from flexc.ir.experts_impl import override_op

        self.model, self.groups = model, model.flexc.groups
        tables = model.flexc.tables
        full = torch.tensor([[g.intermediate_size] * g.num_experts for g in self.groups], dtype=torch.int32)
        self.levels = [full] + [t.to(torch.int32) for t in tables.tables]  # keep descending
        self.rule = None  # layer -> (threshold, upper level, lower level); None: record routing weights
        self.static = None  # a level index: every pair at that table (the static baseline)
        self.weights: list[list[torch.Tensor]] = [[] for _ in self.groups]
        self.used: list[list[torch.Tensor]] = [[] for _ in self.groups]
        for i, g in enumerate(self.groups):
            override_op(model.get_submodule(g.path), self._op(i))

    def _op(self, layer: int):
        from flexc.ir.op import ExpertWeights, run_experts

        def op(hidden, ids, weights, gate_up, down, gate_up_bias, down_bias, widths, activation, interleaved,
               alpha, limit):
            w = ExpertWeights.of(gate_up, down, gate_up_bias, down_bias, activation, interleaved, alpha, limit)
            if self.static is not None:
                pair = self.levels[self.static][layer][ids]
            elif self.rule is None:
                self.weights[layer].append((weights.detach().flatten().float(), ids.flatten()))
                pair = self.levels[0][layer][ids]
            else:
                threshold, upper, lower = self.rule[layer]
                if threshold.dim():  # one threshold per expert
                    threshold = threshold[ids]
                pair = torch.where(weights >= threshold, self.levels[upper][layer][ids], self.levels[lower][layer][ids])
            self.used[layer].append((pair.float() / self.groups[layer].intermediate_size).flatten())
            return run_experts(hidden, ids, weights, w, pair)

        return op

    def realised_keep(self) -> float:
        used = torch.cat([torch.cat(u) for u in self.used if u])
        self.used = [[] for _ in self.groups]
        return float(used.mean())

    def calibrate_per_expert(self, static: int, upper: int, lower: int) -> None:
        """As :meth:`calibrate`, with one threshold per expert: each expert's pairs keep, on the calibration text,
        at most the ``static`` level's width of that expert on average (the learned allocation between experts
        is kept; only its tokens are spread by confidence)."""
        rule = {}
        for layer, recorded in enumerate(self.weights):
            w = torch.cat([r[0] for r in recorded])
            e = torch.cat([r[1] for r in recorded])
            thresholds = torch.full((self.groups[layer].num_experts,), float("inf"))
            for expert in range(len(thresholds)):
                mine = w[e == expert]
                if not mine.numel():
                    continue
                target = float(self.levels[static][layer][expert]) * mine.numel()
                up, lo = float(self.levels[upper][layer][expert]), float(self.levels[lower][layer][expert])
                n = int((lo * mine.numel() + (up - lo) * torch.arange(1, mine.numel() + 1) <= target + 1e-6).sum())
                if n > 0:
                    thresholds[expert] = torch.sort(mine, descending=True).values[n - 1]
            rule[layer] = (thresholds, upper, lower)
        self.rule = rule

    def calibrate(self, static: int, upper: int, lower: int) -> None:
        """Per layer, the routing-weight threshold above which pairs run at ``upper`` (below: ``lower``) whose
        mean keep over the recorded calibration pairs is the most that stays at or below the ``static``
        level's there."""
        rule = {}
        for layer, recorded in enumerate(self.weights):
            w = torch.cat([r[0] for r in recorded])
            e = torch.cat([r[1] for r in recorded])
            full = self.groups[layer].intermediate_size
            target = float((self.levels[static][layer][e].float() / full).sum())
            up, lo = (self.levels[upper][layer][e].float() / full), (self.levels[lower][layer][e].float() / full)
            order = torch.argsort(w, descending=True)
            kept = lo.sum() + torch.cumsum((up - lo)[order], 0)  # total keep with the top n pairs at upper
            n = int((kept <= target + 1e-6).sum())
            threshold = float(w[order][n - 1]) if n > 0 else float("inf")
            rule[layer] = (torch.tensor(threshold), upper, lower)
        self.rule = rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--method", default="coverage", choices=["coverage", "flexmoe"])
    parser.add_argument("--budgets", default="0.75,0.5,0.35,0.25")
    parser.add_argument("--targets", default="0.5,0.35")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--eval-tokens", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "flexc" / "bench-adaptive")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import flexc
    import flexc.zoo
    from flexc.compiler.spec import DataSource
    from flexc.data.calibration import CalibrationSet, LoadedCalibration
    from flexc.eval.perplexity import evaluate, evaluation_stream

    budgets = [float(b) for b in args.budgets.split(",")]
    recipe = json.loads((flexc.zoo.resolve(args.model) / "manifest.json").read_text())["recipe"]
    corpus, seq_len = recipe.get("corpus", "python-stdlib"), recipe["seq_len"]
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        run = compile_nested(args.model, args.method, budgets, seed, args.workdir)
        model = flexc.load(run / "nested")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(run / "nested")
        held = DataSource(builtin=corpus, split="heldout", seq_len=seq_len, batch_size=16,
                          num_samples=args.eval_tokens // seq_len)
        stream = evaluation_stream(held, tokenizer)
        calib = LoadedCalibration(CalibrationSet(DataSource(builtin=corpus, split="train", seq_len=seq_len,
                                                            batch_size=8, num_samples=64), tokenizer, seed=seed))
        policy = PairPolicy(model)
        with torch.no_grad():
            for ids in calib:  # routing weights at full width
                model(ids)
        policy.used = [[] for _ in policy.groups]

        def ppl() -> tuple[float, float]:
            with torch.no_grad():
                r = evaluate(model, tokenizer, held, stream=stream)
            return r.perplexity, policy.realised_keep()

        policy.static = 0
        base, _ = ppl()
        tables = model.flexc.tables
        for target in [float(t) for t in args.targets.split(",")]:
            level = 1 + min(range(len(tables.budgets)), key=lambda j: abs(tables.budgets[j] - target))
            policy.static = level
            static_ppl, keep = ppl()
            policy.static = None
            last = len(policy.levels) - 1
            rules = {"adjacent": (level - 1, min(level + 1, last), policy.calibrate),
                     "extreme": (0, last, policy.calibrate),
                     "expert": (level - 1, min(level + 1, last), policy.calibrate_per_expert)}
            row = {"seed": seed, "target": target, "unpruned": base, "static": static_ppl, "static_keep": keep}
            for name, (upper, lower, calibrate) in rules.items():
                calibrate(level, upper, lower)
                p, k = ppl()
                policy.rule = None
                row.update({name: p, f"{name}_keep": k,
                            f"{name}_ratio": (p - base) / (static_ppl - base) if static_ppl > base else None})
            rows.append(row)
            print(json.dumps(row))
    print_table(rows, ["seed", "target", "unpruned", "static", "static_keep", "adjacent", "adjacent_keep",
                       "adjacent_ratio", "extreme", "extreme_keep", "extreme_ratio", "expert", "expert_keep",
                       "expert_ratio"])
    out = args.out or RESULTS / f"adaptive_widths_{args.model}_{args.method}.json"
    write_json(out, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
