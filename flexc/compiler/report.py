"""``report.md``: the page a user opens first after ``flexc compile``.

Written at the end of every compile into the output directory, with its figures in
``report/``: what was compiled, per budget the achieved keep ratio, routed and total
parameters and bytes, held-out perplexity when the spec has evaluation data, the widths
chosen per layer and expert, the time each stage took, and links to the plots passes made
(channel scores, anneal curves).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flexc.compiler.artifacts import REPORT_FILE, write_text
from flexc.ir.state import CompileState
from flexc.ir.tables import WidthTables
from flexc.ir.quant.scheme import QuantScheme
from flexc.utils.atomic import atomic_path

FIGURES_DIR = "report"

log = logging.getLogger("flexc")


def _fmt_count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def budget_rows(graph, state: CompileState) -> list[dict[str, Any]]:
    """Per budget (full width first): keep ratios, parameter counts, bytes of the routed experts (as a sliced
    checkpoint stores them: quantized codes and scales after ``quantize``) and of the whole model."""
    import torch

    from flexc.export.nested import budget_sizes

    tables = state.checked_width_tables(allow_expert_masks=True)
    params = list(graph.model.parameters())
    total = sum(p.numel() for p in params)
    size = params[0].element_size()
    widest = torch.tensor([[g.intermediate_size] * g.num_experts for g in graph.groups])
    full = WidthTables(budgets=[1.0], tables=widest[None], metric="params", layers=tables.layers, full=tables.full)
    rows = budget_sizes(graph.groups, full, total, size) + budget_sizes(graph.groups, tables, total, size)
    rows[0]["keep"] = rows[0]["keep_achieved"] = 1.0
    q = state.quantization
    scheme = QuantScheme(q["scheme"], q["group_size"]) if q is not None else None
    for r, table in zip(rows, [full.tables[0], *tables.tables]):
        r["routed_bytes"] = r["routed_params"] * size
        if scheme is not None:  # the expert weights as codes and scales, biases as they are
            weights = sum(int(table[i].sum()) * 3 * g.hidden_size for i, g in enumerate(graph.groups))
            r["routed_bytes"] = round(scheme.weight_bytes(weights, size) + (r["routed_params"] - weights) * size)
        r["bytes"] = (r["total_params"] - r["routed_params"]) * size + r["routed_bytes"]
    return rows


def _quantization_line(state: CompileState) -> list[str]:
    q = state.quantization
    if q is None:
        return []
    return [f"Routed experts quantized by `quantize`: {q['scheme']} (int{q['bits']}, one scale per {q['group_size']} "
            f"input channels, {q['method']}); bytes count them as codes and scales, as a sliced checkpoint stores "
            "them, and every perplexity is the quantized model's (1 included).", ""]


def measure_quality(graph, state: CompileState, spec, tokenizer, budgets: list[float]) -> dict[float, float]:
    """Held-out perplexity of the graph at each budget (state's tables), full width restored after."""
    from flexc.eval.budgets import apply_budget
    from flexc.eval.perplexity import evaluate, evaluation_stream

    source = spec.data.evaluation
    stream = evaluation_stream(source, tokenizer)
    out = {}
    try:
        for b in budgets:
            apply_budget(graph, state, None if b == 1.0 else b)
            out[b] = evaluate(graph, tokenizer, source, stream=stream).perplexity
    finally:
        apply_budget(graph, state, None)
    return out


def _plot_widths(graph, tables: WidthTables, path: Path) -> None:
    """One heat map per budget: widths / full width, layers × experts."""
    import matplotlib
    import torch

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = tables.budgets
    tables = tables.tables.float()
    full = torch.tensor([g.intermediate_size for g in graph.groups], dtype=torch.float32)[:, None]
    fig, axes = plt.subplots(1, len(budgets), figsize=(3.2 * len(budgets), 0.35 * len(full) + 1.6), squeeze=False)
    layers = [g.layer for g in graph.groups]
    for i, (ax, b, table) in enumerate(zip(axes[0], budgets, tables)):
        im = ax.imshow((table / full).numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"keep {b:g}")
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        if i == 0:
            ax.set_ylabel("decoder layer")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="width / full width")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _plot_quality(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    keep = [r["keep_achieved"] for r in rows]
    ax.plot(keep, [r["perplexity"] for r in rows], marker="o")
    ax.set_xlabel("keep ratio of routed-expert parameters (achieved)")
    ax.set_ylabel("held-out perplexity")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _state_records(state: CompileState) -> list[str]:
    """Lines for what the passes recorded about the tables, the fine-tune and the kernels."""
    lines = []
    if state.width_tables is not None:
        lines.append(f"- **width tables**: chosen by `{state.width_method or 'anneal'}`")
    if state.recovered_keep is not None:
        lines.append(f"- **recover**: fine-tuned at keep {state.recovered_keep:g}")
    if state.kernel_backend is not None:
        lines.append(f"- **expert kernels**: `{state.kernel_backend}`")
    if state.quantization is not None:
        q = state.quantization
        lines.append(f"- **quantize**: {q['scheme']} (group {q['group_size']}, {q['method']}) on the routed experts")
    if state.adaptive_policy is not None:
        lines += _adaptive_lines(state.adaptive_policy)
    return lines


def _adaptive_lines(policy: dict) -> list[str]:
    """The token-adaptive policy: per budget its target active keep and, on held-out text, what it realised and
    its loss (fitted to the static table's keep there) beside the static table's."""
    report = policy.get("report") or {}
    held = report.get("held_out") or {}
    target = "each static table's active keep" if policy["target"] == "table" else "the budget as active keep"
    lines = [f"- **adaptive widths** (rule `{policy['rule']}`, calibrated to {target}; `flexc.load(..., "
             "adaptive=True)`)" + ("" if held else ": not compared on held-out text")]
    for budget, row in held.items():
        target = (report.get("budgets") or {}).get(budget, {}).get("target_keep")
        verdict = "better" if row["adaptive_loss"] < row["static_loss"] - 1e-6 else (
            "worse" if row["adaptive_loss"] > row["static_loss"] + 1e-6 else "the same")
        lines.append(f"  - keep {budget}: active keep {row['adaptive_keep']:.3f} on held-out text (target "
                     f"{target:.3f}; static table {row['static_keep']:.3f}); loss at the table's keep "
                     f"{row['adaptive_loss']:.4f} vs {row['static_loss']:.4f} static: {verdict}"
                     + (f"; runs {_runs(row.get('policy'))}" if row.get("policy") else ""))
    return lines


def _runs(policy: str) -> str:
    """What a budget runs, from the held-out choice's ``policy`` (a rule's name, or ``static (why)``)."""
    return "the static table" + policy[len("static"):] if policy.startswith("static") else f"rule `{policy}`"


def _how_chosen(out: Path) -> list[str]:
    """Lines saying when and how each budget's table was chosen, from the last stage that trained
    width tables (its ``width_tables.json`` records it per budget)."""
    import json

    reports = sorted((out / "stages").glob("*/width_tables.json")) if (out / "stages").is_dir() else []
    budgets = json.loads(reports[-1].read_text()).get("budgets", []) if reports else []
    if not budgets or "how" not in budgets[0]:
        return []
    lines = ["### How each table was chosen", "", f"From `{reports[-1].relative_to(out).as_posix()}`:", "",
             "| keep (target) | chosen | after step | held-out calibration loss per candidate | "
             "trained − one-shot (± standard error) |",
             "|---|---|---|---|---|"]
    for b in budgets:
        losses = b.get("validation_loss") or {}
        shown = ", ".join(f"{name.replace('_', ' ')} {loss:.4g}" for name, loss in losses.items()) or "–"
        diff = b.get("validation_difference")
        versus = (f"{diff['mean']:+.3g} ± {diff['standard_error']:.2g} (vs {diff['against'].replace('_', ' ')})"
                  if diff else "–")
        lines.append(f"| {b['keep_target']:g} | {b['how']} | {b.get('exported_at_step', '–')} | {shown} | {versus} |")
    return lines + [""]


def write_report(out: Path, manifest: dict[str, Any], spec, graph=None, state: CompileState | None = None,
                 tokenizer=None) -> Path:
    """Write ``out/report.md`` (and ``out/report/*.png``) from the run's manifest and results."""
    out = Path(out)
    figures = out / FIGURES_DIR
    figures.mkdir(exist_ok=True)
    state = state if state is not None else CompileState()
    metric = state.width_tables.metric if state.width_tables is not None else "params"
    model = manifest.get("model", {})
    lines = ["# flexc compile report", ""]
    lines += [f"- **model**: `{model.get('directory', '?')}` ({model.get('family', '?')}, "
              f"{_fmt_count(int(model.get('parameters', 0)))} parameters, {model.get('dtype', '?')})",
              f"- **pipeline**: {' → '.join(e.name for e in spec.pipeline) or '(empty)'}",
              f"- **seed**: {spec.seed}; **flexc** {manifest.get('versions', {}).get('flexc', '?')}, "
              f"torch {manifest.get('versions', {}).get('torch', '?')}, "
              f"transformers {manifest.get('versions', {}).get('transformers', '?')}",
              f"- **outputs**: {', '.join(f'`{v}`' for v in manifest.get('outputs', {}).values())}"]
    lines += _state_records(state) + [""]

    rows: list[dict[str, Any]] = []
    if graph is not None and state.width_tables is not None:
        rows = budget_rows(graph, state)
        quality = {}
        if getattr(getattr(spec, "data", None), "evaluation", None) is not None and tokenizer is not None:
            try:
                quality = measure_quality(graph, state, spec, tokenizer, [r["keep"] for r in rows])
            except Exception as exc:  # noqa: BLE001 -- a report without perplexity beats no report
                log.warning("report: held-out perplexity not measured: %s", exc)
        for r in rows:
            r["perplexity"] = quality.get(r["keep"])
        lines += ["## Budgets", "",
                  f"Keep ratios are fractions of routed-expert parameters kept"
                  f"{' (targets in the FLOPs metric)' if metric == 'flops' else ''}; 1 is the unpruned model.", "",
                  *_quantization_line(state),
                  "| keep (target) | keep (achieved, params) | routed params | total params | routed bytes | bytes |"
                  + (" held-out ppl | Δ ppl |" if quality else ""),
                  "|---|---|---|---|---|---|" + ("---|---|" if quality else "")]
        base = rows[0].get("perplexity")
        for r in rows:
            cells = [f"{r['keep']:g}", f"{r['keep_achieved']:.3f}", _fmt_count(r["routed_params"]),
                     _fmt_count(r["total_params"]), _fmt_bytes(r["routed_bytes"]), _fmt_bytes(r["bytes"])]
            if quality:
                ppl = r.get("perplexity")
                cells += [f"{ppl:.2f}" if ppl is not None else "–",
                          f"{ppl - base:+.2f}" if ppl is not None and base is not None else "–"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if quality:
            _plot_quality(rows, figures / "quality.png")
            src = spec.data.evaluation
            what = src.builtin or src.hub or ", ".join(map(str, src.files or []))
            lines += [f"Perplexity on the first {src.num_samples} × {src.seq_len}-token windows of `data.evaluation` "
                      f"({what}{', split ' + src.split if src.split else ''}, documents in order), not on the whole "
                      "split: a zoo model's manifest scores its entire held-out split, so its figure differs.", "",
                      f"![perplexity against keep ratio]({FIGURES_DIR}/quality.png)", ""]
        else:
            lines += ["(Add `data.evaluation` to the spec to measure held-out perplexity per budget.)", ""]
        lines += _how_chosen(out)
        _plot_widths(graph, state.width_tables, figures / "widths.png")
        lines += ["## Widths per layer and expert", "", f"![widths]({FIGURES_DIR}/widths.png)", ""]

    plots = sorted((out / "stages").glob("*/*.png")) if (out / "stages").is_dir() else []
    if plots:
        lines += ["## Plots from the passes", ""]
        lines += [f"- {p.parent.name}: ![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots]
        lines.append("")

    stages = manifest.get("stages", [])
    if stages:
        lines += ["## Time per stage", "", "| stage | status | seconds |", "|---|---|---|"]
        lines += [f"| {s['name']} | {s.get('status', '?')} | {s.get('seconds', 0):.1f} |" for s in stages]
        lines.append("")
    # A compact copy for the CLI's closing table (the driver saves the manifest after this).
    manifest["summary"] = {"report": REPORT_FILE, "metric": metric, "budgets": [
        {k: r.get(k) for k in ("keep", "keep_achieved", "total_params", "routed_bytes", "bytes", "perplexity")}
        for r in rows]}
    path = out / REPORT_FILE
    write_text(path, "\n".join(lines))
    return path
