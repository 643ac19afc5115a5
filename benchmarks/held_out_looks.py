"""How much held-out text the anneal's check reads under a rule of early looks, and how often
stopping early chooses differently from reading it all.

Runs the anneal (defaults, ``selection: {early_z: null}``: every candidate table scored on all of
the held-out text) on zoo models at several seeds of its Gumbel noise, keeps each phase's
per-sequence held-out losses, and replays the check on them under each rule of looks (shares of
the sequences, standard errors), through the pass's own :meth:`HeldOutCheck.verdict` and
:func:`look_ends`. Prints the share of the scoring each rule reads and the phases where its
choice differs from the full read, and writes the JSON.

    python benchmarks/held_out_looks.py --out benchmarks/results/held_out_looks.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from flexc.passes import resolve_pass  # noqa: E402
from flexc.passes.anneal_options import EARLY_LOOKS, EARLY_Z, Selection  # noqa: E402
from flexc.passes.table_selection import HeldOutCheck, look_ends  # noqa: E402

BUDGETS = {"small": [0.75, 0.6, 0.5, 0.35, 0.25]}  # the anneal benchmark's; the others: quality.py's
QUALITY_BUDGETS = [0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2]
RULES = [  # (shares of the held-out sequences at the early looks, standard errors a decision needs there)
    (EARLY_LOOKS, EARLY_Z),
    ((0.5,), 3.0),
    ((0.5,), 2.5),
    ((0.3, 0.5, 0.7), 3.0),
    ((0.2, 0.3, 0.5, 0.7), 2.5),
]


def phases_of(model: str, seed: int, samples: int) -> list[dict]:
    """Every checked phase of one anneal: the per-sequence losses of its candidates on all of the
    held-out text, its one-shot candidates, the one the trained table equals, the batch sizes."""
    phases = []
    verdict, choose = HeldOutCheck.verdict, HeldOutCheck.choose

    def record_batches(self, setup, record, trained, one_shot, same, val):
        self._sizes = [setup.rows[i][1] for i in val]
        return choose(self, setup, record, trained, one_shot, same, val)

    def record(self, held_out, one_shot, same, z, final=False):
        if final:
            phases.append({"held_out": {k: dict(v) for k, v in held_out.items()}, "one_shot": list(one_shot),
                           "same": same, "sizes": self._sizes})
        return verdict(self, held_out, one_shot, same, z, final)

    HeldOutCheck.verdict, HeldOutCheck.choose = record, record_batches
    try:
        setup = common.gated_setup(model, samples, BUDGETS.get(model, QUALITY_BUDGETS), prefix="flexc-looks-")
        setup.ctx.seed = seed
        resolve_pass("anneal")({"selection": {"early_z": None}})(setup.graph, setup.ctx)
    finally:
        HeldOutCheck.verdict, HeldOutCheck.choose = verdict, choose
    return phases


def replay(phase: dict, shares, z: float, judge: HeldOutCheck) -> tuple[str, int, int]:
    """The rule's choice on one phase, the sequences it read and all there were."""
    held, one_shot, same, sizes = phase["held_out"], phase["one_shot"], phase["same"], phase["sizes"]
    total = sum(sizes)
    for end in look_ends(sizes, shares):
        read = sum(sizes[:end])
        final = read == total
        part = {name: {k: v[:read] for k, v in losses.items()} for name, losses in held.items()}
        choice = judge.verdict(part, one_shot, same, judge.options.z if final else z, final=final)
        if choice is not None:
            return choice["choice"], read, total
    raise AssertionError("the last look always decides")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small:0,1;tiny:0,1,2;mixtral-tiny:0,1,2",
                        help="MODEL:SEEDS;... (the Gumbel noise's seeds)")
    parser.add_argument("--samples", type=int, default=64, help="calibration sequences")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    judge = HeldOutCheck(Selection(), "distill")
    runs = {}
    for entry in args.models.split(";"):
        model, seeds = entry.split(":")
        runs[model] = [phases_of(model, int(seed), args.samples) for seed in seeds.split(",")]
    rows, differing = [], []
    for shares, z in RULES:
        row = {"looks": list(shares), "z": z}
        for model, seeds in runs.items():
            read = total = differ = 0
            for seed_index, phases in enumerate(seeds):
                for index, phase in enumerate(phases):
                    full = replay(phase, (), z, judge)[0]
                    choice, n, all_ = replay(phase, shares, z, judge)
                    read, total, differ = read + n * len(phase["held_out"]), total + all_ * len(phase["held_out"]), \
                        differ + (choice != full)
                    if choice != full:
                        means = {name: {k: float(v.mean()) for k, v in losses.items()}
                                 for name, losses in phase["held_out"].items()}
                        differing.append({"looks": list(shares), "z": z, "model": model, "seed": seed_index,
                                          "phase": index, "early": choice, "full": full, "read": n,
                                          "losses_on_all": means})
            row[f"{model} read"] = round(read / total, 3)
            row[f"{model} differ"] = f"{differ}/{sum(len(p) for p in seeds)}"
        rows.append(row)
    print("\nShare of the held-out scoring read, and choices that differ from reading it all")
    common.print_table(rows, list(rows[0]))
    common.write_json(args.out or common.RESULTS / "held_out_looks.json",
                      {"models": args.models, "samples": args.samples, "rules": rows, "differing": differing})


if __name__ == "__main__":
    main()
