"""How far ``anneal``'s held-out check and an evaluation on other documents disagree.

Each budget's held-out check scores its candidate tables (the trained one and the one-shot ones)
on calibration documents no training batch came from, and keeps one (``anneal``'s
``held_out_candidates.json``). Scoring the same candidates on the evaluation text says whether
the check chose what other documents would have chosen, and what a wrong choice cost there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from flexc.passes.anneal import CANDIDATES_JSON, TABLES_JSON


def check_against_evaluation(graph, anneal_dir: Path, evaluate: Callable[[], float]) -> list[dict] | None:
    """One row per budget whose held-out check ran, from the anneal stage folder ``anneal_dir``;
    ``evaluate()`` is the evaluation text's mean next-token loss of ``graph`` at its current widths.
    None where the folder records no candidates (no check ran, or an older flexc wrote it).

    A row holds every candidate's losses on the check (``check``: its ranking loss and next-token
    loss) and on the evaluation text (``evaluation``: next-token loss and perplexity); the one the
    check ``chosen`` and the evaluation's ``best``; ``regret``: the chosen table's evaluation
    perplexity over the best one's; and, where the trained table differs from the best one-shot
    table on the check (the fallback), the differences trained − fallback: of the check's ranking loss
    (``check_loss_difference``), of its next-token loss (``check_difference``) and of the evaluation
    text's next-token loss (``evaluation_difference``), and whether each check difference has the
    evaluation's sign (``agree``: ``{"loss": ..., "next_token": ...}``)."""
    path = Path(anneal_dir) / CANDIDATES_JSON
    if not path.is_file():
        return None
    candidates = json.loads(path.read_text())["budgets"]
    records = {b["keep_target"]: b for b in json.loads((Path(anneal_dir) / TABLES_JSON).read_text())["budgets"]}
    saved, rows = graph.widths(), []
    try:
        for entry in candidates:
            record = records[entry["keep_target"]]
            evaluation = {}
            for name, widths in entry["widths"].items():
                graph.set_widths(widths)
                loss = evaluate()
                evaluation[name] = {"loss": loss, "ppl": math.exp(loss)}
            rows.append(_row(entry, record, evaluation))
    finally:
        graph.set_widths(saved)
    return rows


def _row(entry: dict, record: dict, evaluation: dict) -> dict:
    check = {name: {"loss": record["validation_loss"][name], "next_token": record["validation_next_token"][name]}
             for name in evaluation}
    chosen, best = entry["chosen"], min(evaluation, key=lambda n: evaluation[n]["loss"])
    row = {"keep_target": entry["keep_target"], "chosen": chosen, "best": best,
           "regret": evaluation[chosen]["ppl"] - evaluation[best]["ppl"],
           "held_out_sequences": record.get("held_out_read"), "check": check, "evaluation": evaluation}
    one_shot = [n for n in evaluation if n != "trained"]
    fallback = min(one_shot, key=lambda n: check[n]["loss"])  # the check's fallback: its lowest one-shot loss
    if entry["widths"]["trained"] != entry["widths"][fallback]:
        on_check = {key: check["trained"][key] - check[fallback][key] for key in ("loss", "next_token")}
        on_evaluation = evaluation["trained"]["loss"] - evaluation[fallback]["loss"]
        row.update(fallback=fallback, check_loss_difference=on_check["loss"],
                   check_difference=on_check["next_token"], evaluation_difference=on_evaluation,
                   agree={key: (d < 0) == (on_evaluation < 0) for key, d in on_check.items()})
    return row


def markdown(rows_by_method: dict[str, list[dict]]) -> str:
    """The rows as a markdown section: per budget the check's choice, the evaluation's, the regret and
    the trained − fallback next-token loss difference on each text."""
    lines = ["## The held-out check against the evaluation text", "",
             "Differences are trained − fallback (the check's best one-shot table): the check's ranking loss, "
             "then next-token loss on each text.", "",
             "| method | keep | check chose | evaluation's best | regret (ppl) | check, ranking loss | "
             "check, next-token | evaluation, next-token | sign as the evaluation's (ranking / next-token) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, rows in rows_by_method.items():
        for r in rows:
            diff = ((f"{r['check_loss_difference']:+.4f}", f"{r['check_difference']:+.4f}",
                     f"{r['evaluation_difference']:+.4f}",
                     " / ".join("yes" if r["agree"][k] else "no" for k in ("loss", "next_token"))) if "agree" in r
                    else ("same table",) * 3 + ("–",))
            lines.append(f"| {method} | {r['keep_target']:g} | {r['chosen']} | {r['best']} | {r['regret']:.3f} | "
                         + " | ".join(diff) + " |")
    return "\n".join(lines) + "\n"
