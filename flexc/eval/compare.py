"""Compare width-choosing methods on one model, one calibration set and one set of budgets.

Every method starts from the same ranked model (``rank_channels`` with the spec's options, run
once) and the same budgets in the same metric, so a keep ratio means the same parameter count
for all of them. Methods are named as on the command line:

- ``flexmoe``: the spec's ``insert_action_gates`` and ``anneal`` (learned nested widths);
- ``uniform``, ``coverage``: the baseline passes of :mod:`flexc.passes.baselines`;
- ``expert_prune[:CRITERION]``: whole experts removed (criterion: frequency, router_weight,
  man, msan, reap).

Baselines run before ``flexmoe`` because its action gates stay in the graph (at full width).
Each budget of each method is evaluated on the same held-out tokens; the result is a JSON
file, a Markdown table and a plot of perplexity against keep ratio.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flexc.eval.budgets import apply_budget
from flexc.eval.perplexity import check_no_leak, evaluate, evaluation_stream
from flexc.passes import PassContext, resolve_pass
from flexc.passes.manager import run_pass
from flexc.passes.width_tables import expert_weights, keep_ratio
from flexc.utils.atomic import atomic_path, atomic_write_text

BASELINES = ("uniform", "coverage", "expert_prune")
METHODS = ("flexmoe", *BASELINES)


@dataclass
class Method:
    label: str  # as given, e.g. "expert_prune:man"
    passes: list[tuple[str, dict]] = field(default_factory=list)


def parse_methods(text: str, spec=None) -> list[Method]:
    """``"flexmoe,uniform,expert_prune:man"`` -> the passes each method runs after ranking."""
    entries = {e.name: dict(e.options) for e in getattr(spec, "pipeline", None) or []}
    out = []
    for label in [m.strip() for m in text.split(",") if m.strip()]:
        name, _, arg = label.partition(":")
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)} "
                             "(expert_prune takes a criterion: expert_prune:man)")
        if arg and name != "expert_prune":
            raise ValueError(f"method {name!r} takes no ':' argument (found {label!r})")
        if name == "flexmoe":
            passes = [("insert_action_gates", entries.get("insert_action_gates", {})),
                      ("anneal", entries.get("anneal", {}))]
        elif name == "expert_prune":
            passes = [(name, {**entries.get(name, {}), **({"criterion": arg} if arg else {})})]
        else:
            passes = [(name, entries.get(name, {}))]
        for pass_name, options in passes:
            resolve_pass(pass_name)(options)  # validate options before anything runs
        out.append(Method(label, passes))
    if not out:
        raise ValueError("no methods given")
    if [m.label.split(":")[0] for m in out].count("flexmoe") > 1:
        raise ValueError("flexmoe may be given once")
    return sorted(out, key=lambda m: m.label.startswith("flexmoe"))  # gates stay in the graph: run last


def compare(spec, methods: list[Method], out_dir: Path, *, quiet: bool = False, logger=None) -> dict:
    """Run ``methods`` on the spec's model and data; write ``compare.{json,md,png}`` into ``out_dir``."""
    import logging

    from flexc import models
    from flexc.data.calibration import CalibrationSet
    from flexc.ir import lower

    logger = logger or logging.getLogger("flexc")
    if spec.budgets is None:
        raise ValueError("compare needs budgets in the spec")
    if spec.data.calibration is None or spec.data.evaluation is None:
        raise ValueError("compare needs data.calibration (for the passes) and data.evaluation (held-out text)")
    check_no_leak(spec.data.calibration, spec.data.evaluation)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = models.load_model(spec.model, progress=not quiet)
    tokenizer = loaded.tokenizer
    graph = lower(loaded.model)
    batches = list(CalibrationSet(spec.data.calibration, tokenizer, seed=spec.seed))
    stream = evaluation_stream(spec.data.evaluation, tokenizer)

    def ctx(name: str, state: dict) -> PassContext:
        return PassContext(workdir=out_dir / "work" / name.replace(":", "."), spec=spec, seed=spec.seed,
                           state=state, logger=logger, quiet=quiet, tokenizer=tokenizer, calibration_data=batches)

    def ppl() -> dict:
        r = evaluate(graph, tokenizer, spec.data.evaluation, stream=stream)
        return {"loss": r.loss, "ppl": r.perplexity, "tokens": r.tokens}

    base = ppl()
    ranked = ctx("rank_channels", {})
    rank_options = next((dict(e.options) for e in spec.pipeline if e.name == "rank_channels"), {"plot": False})
    run_pass(resolve_pass("rank_channels")(rank_options), graph, ranked)
    rows = [{"method": "unpruned", "keep_target": 1.0, "keep": 1.0, "params_keep": 1.0, **base}]
    metric = spec.budgets.metric
    full = torch.tensor([g.intermediate_size for g in graph.groups])
    seconds, skipped = {}, {}
    for method in methods:
        c = ctx(method.label, dict(ranked.state))
        start = time.perf_counter()
        for pass_name, options in method.passes:
            if pass_name == "expert_prune":  # top_k experts per layer must remain: lower budgets are unreachable
                floor = max(g.top_k / g.num_experts for g in graph.groups)
                reachable = [b for b in spec.budgets.keep_ratios if b >= floor - 1e-9]
                skipped[method.label] = [b for b in spec.budgets.keep_ratios if b < floor - 1e-9]
                options = {**options, "budgets": reachable}
            run_pass(resolve_pass(pass_name)(options), graph, c)
        seconds[method.label] = time.perf_counter() - start
        weights = expert_weights(graph.groups, metric, c.state.get("routing_counts"))
        params_w = expert_weights(graph.groups, "params")
        for b, table in zip(c.state["width_budgets"].tolist(), c.state["width_tables"]):
            apply_budget(graph, c.state, b)
            rows.append({"method": method.label, "keep_target": round(b, 6), "keep": keep_ratio(table, full, weights),
                         "params_keep": keep_ratio(table, full, params_w), **ppl()})
        apply_budget(graph, c.state, None)
        logger.info("compare: %s done in %.1fs", method.label, seconds[method.label])
    result = {"model": spec.model.source, "metric": metric, "budgets": list(spec.budgets.keep_ratios),
              "eval_tokens": base["tokens"], "seconds": seconds,
              "unreachable_budgets": skipped, "results": rows}
    atomic_write_text(out_dir / "compare.json", json.dumps(result, indent=2, default=str))
    atomic_write_text(out_dir / "compare.md", markdown_table(rows, metric))
    plot(rows, out_dir / "compare.png", title=f"held-out perplexity vs keep ({metric}), {base['tokens']} tokens")
    return result


def markdown_table(rows: list[dict], metric: str = "params") -> str:
    """Perplexity per method (rows) and keep target (columns)."""
    targets = sorted({r["keep_target"] for r in rows if r["method"] != "unpruned"}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "unpruned"))
    base = next((r["ppl"] for r in rows if r["method"] == "unpruned"), None)
    lines = [f"Held-out perplexity (lower is better); unpruned: {base:.3f}" if base else "Held-out perplexity", "",
             "| method | " + " | ".join(f"keep {t:g}" for t in targets) + " |",
             "|---|" + "---:|" * len(targets)]
    for m in methods:
        cells = []
        for t in targets:
            r = next((r for r in rows if r["method"] == m and abs(r["keep_target"] - t) < 1e-9), None)
            cells.append("-" if r is None else f"{r['ppl']:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"Keep ratios are fractions of routed-expert {'parameters' if metric == 'params' else metric} "
              "kept; every method's table is at or just below its target."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "unpruned"):
        pts = sorted((r["params_keep"], r["ppl"]) for r in rows if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    base = next((r["ppl"] for r in rows if r["method"] == "unpruned"), None)
    if base is not None:
        ax.axhline(base, color="gray", linestyle=":", label="unpruned")
    ax.set_xlabel("keep ratio (routed-expert parameters)")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
