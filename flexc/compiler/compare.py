"""``flexc compare``: width-choosing methods on one model, one calibration set and one set of budgets.

The methods (:mod:`flexc.passes.methods`) are pipelines of passes; every one starts from the
same ranked model (the ranking run once, with the spec's options) and the same budgets in the
same metric, so a keep ratio means the same parameter count for all of them. The model is
loaded and lowered by the compile's in-memory execution (:class:`flexc.compiler.execution.InMemory`)
and the passes run through the same :class:`~flexc.passes.manager.PassRunner`. Each budget of
each method is evaluated on the same held-out tokens; the result is a JSON file, a Markdown
table and a plot of perplexity against keep ratio.

A compile has usually annealed already: when ``run`` (or, by default, the spec's
``export.dir``) holds a compile whose ranking and anneal are those compare would run (same
model, calibration data, budgets, seed, and the learned method's passes first in its pipeline
with the same options, each stage done), compare reads that run's channel permutation and
width tables instead of computing them again.

For the learned method, the tables each budget's held-out check scored are also scored on the
evaluation text (:mod:`flexc.compiler.held_out_check`): ``held_out_check`` in the result says where
the check, which reads calibration documents, chose what the evaluation documents would not.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path

import torch

from flexc.compiler.held_out_check import check_against_evaluation
from flexc.compiler.held_out_check import markdown as check_markdown
from flexc.eval.budgets import apply_budget
from flexc.eval.perplexity import check_no_leak, evaluate, evaluation_stream
from flexc.ir.tables import WidthTables, expert_weights, keep_ratio
from flexc.passes import resolve_pass
from flexc.passes.anneal import TABLES_FILE
from flexc.passes.manager import PassRunner
from flexc.passes.methods import LEARNED_PREFIX, RANKING, Method, ranking_options, steps
from flexc.utils.atomic import atomic_path, atomic_write_text


def _normalised(entries) -> list[tuple[str, dict]]:
    """(name, options with defaults filled) of pipeline entries, comparable across specs."""
    return [(e.name, e.pass_options.model_dump(mode="json", by_alias=True)) for e in entries]


def reusable_run(spec, run_dir: Path) -> tuple[Path, Path, WidthTables] | None:
    """The (rank_channels, anneal) stage folders and the annealed width tables of a compile in ``run_dir``
    that ran what compare's ``flexmoe`` would run for ``spec``, or None (logged when ``run_dir`` holds a
    run that does not fit)."""
    import logging

    from flexc.compiler.artifacts import SPEC_FILE, read_manifest
    from flexc.compiler.spec import Spec

    log = logging.getLogger("flexc")
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest is None:
        return None
    try:
        ran = Spec.from_yaml(run_dir / SPEC_FILE)
        same = (ran.model == spec.model and ran.data.calibration == spec.data.calibration and ran.seed == spec.seed
                and ran.budgets == spec.budgets
                and _normalised(ran.pipeline[:3]) == _normalised(
                    e for name in LEARNED_PREFIX for e in spec.pipeline if e.name == name))
    except Exception as exc:  # noqa: BLE001 -- an unreadable run is simply not reused
        log.info("compare: not reusing the compile in %s: %s", run_dir, exc)
        return None
    done = {r["name"] for r in manifest.get("stages", []) if r.get("status") == "done"}
    stages = [f"{i + 1:02d}-{name}" for i, name in enumerate(LEARNED_PREFIX)]
    rank_dir, anneal_dir = run_dir / "stages" / stages[0], run_dir / "stages" / stages[2]
    if not same or not set(stages) <= done or not (anneal_dir / TABLES_FILE).is_file():
        log.info("compare: the compile in %s is not a finished anneal with these options, model, data, budgets "
                 "and seed; ranking and annealing again", run_dir)
        return None
    from flexc.compiler import integrity

    integrity.verify_stages(run_dir, manifest, stages)  # reused as recorded, or an error naming the edited file
    try:
        tables = WidthTables.load(anneal_dir / TABLES_FILE)
    except Exception as exc:  # noqa: BLE001 -- e.g. written by an older flexc: anneal again
        log.info("compare: not reusing the width tables in %s (%s: %s); ranking and annealing again",
                 anneal_dir / TABLES_FILE, type(exc).__name__, exc)
        return None
    return rank_dir, anneal_dir, tables


def load_spec_or_run(path: str | Path):
    """(spec, run directory or None) for a spec file or a compile's output directory."""
    from flexc.compiler.artifacts import SPEC_FILE, read_manifest
    from flexc.compiler.checks import validate_file

    path = Path(path)
    if path.is_dir() and read_manifest(path) is not None:
        _refuse_code_named_in(path / SPEC_FILE)
        return validate_file(path / SPEC_FILE), path
    return validate_file(path), None


_CODE_NAME = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # module:Class, as a spec names code


def _refuse_code_named_in(spec_file: Path) -> None:
    """A run directory may come from elsewhere: code its spec names (a pass or a score given as
    ``module:Class``) is not imported (checking a spec imports it); the user names it in a spec
    file of their own."""
    from flexc.compiler.errors import FlexcError
    from flexc.compiler.spec import read_spec_text
    from flexc.compiler.yamlpos import YamlSyntaxError, load_with_positions

    try:
        data = load_with_positions(read_spec_text(spec_file), str(spec_file))[0]
    except YamlSyntaxError:
        return  # validate_file reports it
    for i, entry in enumerate(data.get("pipeline") or [] if isinstance(data, dict) else []):
        for where, value in _strings(entry, f"pipeline[{i}]"):
            if _CODE_NAME.match(value):
                raise FlexcError(
                    f"{spec_file}: {where}: {value!r} is code named by a run directory, which flexc compare does not "
                    "import; compare the spec file that names it instead (flexc compare SPEC)")


def _strings(node, where: str):
    """(location, text) of every string in a parsed YAML node, mapping keys included."""
    if isinstance(node, str):
        yield where, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key, where)
            yield from _strings(value, f"{where}.{key}")
    elif isinstance(node, list):
        for j, value in enumerate(node):
            yield from _strings(value, f"{where}[{j}]")


def compare(spec, methods: list[Method], out_dir: Path, *, quiet: bool = False, logger=None,
            run: Path | None = None, recover: bool = False, quantize: list[dict] = (), adaptive: bool = False) -> dict:
    """Run ``methods`` on the spec's model and data; write ``compare.{json,md,png}`` into ``out_dir``.

    ``run``: a compile's output directory whose ranking and width tables to reuse when they are
    what ``flexmoe`` would compute (default: the spec's ``export.dir``). ``recover``: also evaluate
    every method after one ``recover`` on its tables (rows ``METHOD+recover``). ``quantize``: options
    of ``quantize`` passes (:func:`parse_quantize`), each evaluated after every method, and after
    its recover (rows ``METHOD+w4a16-g128-gptq``, ``METHOD+recover+...``). ``adaptive``: also every
    method (and its recover) with a token-adaptive width policy (rows ``METHOD+adaptive``, with the
    realised active keep of the policy and of the static table on the evaluation text). See :func:`_then`.
    """
    import logging

    from flexc.compiler.execution import InMemory
    from flexc.data.calibration import CalibrationSet, LoadedCalibration

    logger = logger or logging.getLogger("flexc")
    if spec.budgets is None:
        raise ValueError("compare needs budgets in the spec")
    if spec.data.calibration is None or spec.data.evaluation is None:
        raise ValueError("compare needs data.calibration (for the passes) and data.evaluation (held-out text)")
    check_no_leak(spec.data.calibration, spec.data.evaluation)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    execution = InMemory(spec, out_dir, quiet=quiet)
    execution.load()
    execution.lower()
    graph, tokenizer = execution.graph, execution.tokenizer
    batches = LoadedCalibration(CalibrationSet(spec.data.calibration, tokenizer, seed=spec.seed))
    stream = evaluation_stream(spec.data.evaluation, tokenizer)
    context = execution.context(out_dir / "work", str(next(graph.model.parameters()).device))
    context.logger, context.calibration_data = logger, batches

    def ppl() -> dict:
        r = evaluate(graph, tokenizer, spec.data.evaluation, stream=stream)
        return {"loss": r.loss, "ppl": r.perplexity, "tokens": r.tokens}

    base = ppl()
    ranking = PassRunner(graph, context, out_dir / "work")
    rank_options = ranking_options(spec)
    run = run if run is not None else spec.export.dir  # where a compile of this spec would be
    reuse = reusable_run(spec, Path(run)) if run is not None else None
    if reuse is not None:  # the same permutation the compile's tables were annealed on
        rank_options = {**rank_options, "from": reuse[0], "plot": False}
        logger.info("compare: reusing the ranking and width tables of %s", reuse[0].parent.parent)
    ranking.run_all([(RANKING, resolve_pass(RANKING)(rank_options))])
    rows = [{"method": "unpruned", "keep_target": 1.0, "keep": 1.0, "params_keep": 1.0, **base}]
    metric = spec.budgets.metric
    full = torch.tensor([g.intermediate_size for g in graph.groups])
    seconds, skipped, reused, not_run, check_rows = {}, {}, {}, {}, {}
    for method in methods:
        # Every method starts from the ranking's state; its passes share one folder, named after it.
        runner = PassRunner(graph, context, out_dir / "work", state=ranking.state.copy(), done=ranking.done)
        start = time.perf_counter()
        if method.learned and reuse is not None:
            runner.state.width_tables = reuse[2]
            reused[method.label] = str(reuse[1])
            built = []
        else:
            built, unreachable = steps(method, graph.groups, list(spec.budgets.keep_ratios))
            if unreachable is not None:
                skipped[method.label] = unreachable
        graph = runner.run_all(built)
        seconds[method.label] = time.perf_counter() - start
        weights = expert_weights(graph.groups, metric, runner.state.routing_counts)
        params_w = expert_weights(graph.groups, "params")

        def measured(label: str, state) -> list[dict]:
            out = []
            for b, table in zip(*_tables(state)):
                apply_budget(graph, state, b)
                out.append({"method": label, "keep_target": round(b, 6), "keep": keep_ratio(table, full, weights),
                            "params_keep": keep_ratio(table, full, params_w), **ppl()})
            apply_budget(graph, state, None)
            return out

        def quantized(base: PassRunner, prefix: str) -> list[dict]:
            out = []
            for options in quantize:
                label = f"{prefix}+{quantize_label(options)}"
                start = time.perf_counter()
                with _then(graph, base, label, [resolve_pass("quantize")(options)]) as after:
                    out += measured(label, after.state)
                seconds[label] = time.perf_counter() - start
            return out

        def with_policy(base: PassRunner, prefix: str) -> list[dict]:
            label = f"{prefix}+adaptive"
            if not adaptive:
                return []
            if base.state.removes_experts():
                not_run[label] = "whole-expert pruning re-routes tokens; adaptive widths need width tables"
                return []
            start = time.perf_counter()
            with _then(graph, base, label, [resolve_pass("adaptive_widths")(adaptive_options(spec))]) as after:
                out = adaptive_rows(graph, after.state, label, lambda model: evaluate(
                    model, tokenizer, spec.data.evaluation, stream=stream), weights, params_w)
            seconds[label] = time.perf_counter() - start
            return out

        rows += measured(method.label, runner.state) + quantized(runner, method.label)
        if method.learned:  # the anneal's held-out check scored on the evaluation text
            anneal_dir = reuse[1] if method.label in reused else out_dir / "work" / method.label
            checked = check_against_evaluation(graph, anneal_dir, lambda: ppl()["loss"])
            if checked is not None:
                check_rows[method.label] = checked
        rows += with_policy(runner, method.label)
        if recover:
            label = f"{method.label}+recover"
            start = time.perf_counter()
            with _then(graph, runner, label, [resolve_pass("recover")(recover_options(spec))]) as after:
                rows += measured(label, after.state)
                seconds[label] = time.perf_counter() - start
                rows += quantized(after, label) + with_policy(after, label)
        logger.info("compare: %s done in %.1fs", method.label, seconds[method.label])
    result = {"model": spec.model.source, "metric": metric, "budgets": list(spec.budgets.keep_ratios),
              "eval_tokens": base["tokens"], "seconds": seconds,
              "unreachable_budgets": skipped, "reused": reused, "not_run": not_run, "results": rows,
              "held_out_check": check_rows}
    atomic_write_text(out_dir / "compare.json", json.dumps(result, indent=2, default=str))
    atomic_write_text(out_dir / "compare.md", markdown_table(rows, metric)
                      + ("\n" + check_markdown(check_rows) if check_rows else ""))
    plot(rows, out_dir / "compare.png", title=f"held-out perplexity vs keep ({metric}), {base['tokens']} tokens")
    return result


def recover_options(spec) -> dict:
    """The spec's ``recover`` options, or (none in its pipeline) the pass's defaults at the spec's budget
    nearest the pass's default keep (0.6), so that a comparison's budgets need not include it."""
    entry = next((dict(e.options) for e in spec.pipeline if e.name == "recover"), None)
    if entry is not None:
        return entry
    default = resolve_pass("recover").Options().keep
    return {"keep": min(spec.budgets.keep_ratios, key=lambda b: (abs(b - default), -b))}


def adaptive_options(spec) -> dict:
    """The spec's ``adaptive_widths`` options, else the pass's defaults (its held-out check reads calibration
    documents, never the comparison's evaluation text)."""
    return next((dict(e.options) for e in spec.pipeline if e.name == "adaptive_widths"), {})


def adaptive_rows(graph, state, label: str, evaluate_model, weights: torch.Tensor,
                  params_weights: torch.Tensor) -> list[dict]:
    """One row per budget: ``evaluate_model``'s perplexity of the Hugging Face model on the state's adaptive
    policy, with the realised active keep of the policy (``active_keep``) and of the static table
    (``static_active_keep``) on the same text, and what the policy runs there (``policy``: a rule, or the static
    table and why)."""
    from flexc.ir.adaptive import AdaptivePolicy, policy_layers, running, static_layers

    tables = state.checked_width_tables()
    policy = AdaptivePolicy.from_dict(state.adaptive_policy, tables, "adaptive_widths' policy")
    modules = [graph.experts_module(g) for g in graph.groups]
    device = next(graph.model.parameters()).device
    full = torch.tensor([g.intermediate_size for g in graph.groups])
    runs = policy.report.get("held_out", {})
    widths, out = graph.widths(), []
    try:
        for b, table in zip(tables.budgets, tables.tables):
            graph.set_widths(table)
            with torch.no_grad(), running(modules, static_layers(tables, b, device)) as keep:
                evaluate_model(graph.model)
                static_keep = keep()
            with torch.no_grad(), running(modules, policy_layers(policy, tables, b, device)) as keep:
                r = evaluate_model(graph.model)
                out.append({"method": label, "keep_target": round(b, 6), "keep": keep_ratio(table, full, weights),
                            "params_keep": keep_ratio(table, full, params_weights), "active_keep": keep(),
                            "static_active_keep": static_keep, "loss": r.loss, "ppl": r.perplexity,
                            "tokens": r.tokens, "policy": runs.get(f"{b:g}", {}).get("policy", policy.rule)})
    finally:
        graph.set_widths(widths)
    return out


def _tables(state) -> tuple[list[float], list[torch.Tensor]]:
    tables = state.checked_width_tables(allow_expert_masks=True)
    return tables.budgets, tables.tables


@contextlib.contextmanager
def _then(graph, runner: PassRunner, label: str, passes: list):
    """Run ``passes`` after a method (``runner``: its graph and state) on a copy of its state; yields their
    runner. The model's weights and the graph's properties are put back afterwards, so the next method
    (or the next follow-up) starts from the same ranked model."""
    saved = {name: value.detach().clone() for name, value in graph.model.state_dict().items()}
    properties = set(graph.properties)
    after = PassRunner(graph, runner.context, runner.workdirs, state=runner.state.copy(), done=runner.done)
    try:
        after.run_all([(label, p) for p in passes])
        yield after
    finally:
        graph.model.load_state_dict(saved)
        graph.properties = properties


def parse_quantize(text: str, spec) -> list[dict]:
    """``--quantize`` (``SCHEME[:METHOD[:GROUP]]``, comma-separated) as ``quantize`` options; what an entry
    leaves out comes from the spec's ``quantize`` pass, else the pass's defaults."""
    from flexc.passes.quantize import QuantizeOptions

    base = next((dict(e.options) for e in spec.pipeline if e.name == "quantize"), {})
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.split(":")
        if len(parts) > 3:
            raise ValueError(f"--quantize {item!r}: expected SCHEME[:METHOD[:GROUP]], e.g. w4a16:gptq:128")
        options = {**base, **dict(zip(("scheme", "method", "group_size"), parts))}
        if "group_size" in options and isinstance(options["group_size"], str):
            if not options["group_size"].isdigit():
                raise ValueError(f"--quantize {item!r}: group size {options['group_size']!r} is not a number")
            options["group_size"] = int(options["group_size"])
        try:
            out.append(QuantizeOptions.model_validate(options).model_dump(mode="json"))
        except ValueError as exc:
            first = exc.errors()[0] if hasattr(exc, "errors") else {"msg": str(exc), "loc": ()}
            raise ValueError(f"--quantize {item!r}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        grid = getattr(spec.budgets, "grid", None)
        if not isinstance(grid, int) or grid % out[-1]["group_size"]:
            raise ValueError(f"--quantize {item!r}: every width must be a whole number of quantization groups of "
                             f"{out[-1]['group_size']}; the spec's budgets.grid is {grid!r}: set it to a multiple of "
                             f"{out[-1]['group_size']}")
    return out


def quantize_label(options: dict) -> str:
    """A row label's suffix for ``quantize`` options, e.g. ``w4a16-g128-gptq``."""
    return f"{options['scheme']}-g{options['group_size']}-{options['method']}"


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
    active = [r for r in rows if "active_keep" in r]
    if active:
        lines += ["", "Adaptive rows run each routed pair at one of two of the table's levels by its routing weight; "
                  "realised active keep (mean routed-pair width over full width) on this text, adaptive / static:", ""]
        lines += [f"- {r['method']} keep {r['keep_target']:g}: {r['active_keep']:.3f} / {r['static_active_keep']:.3f}"
                  for r in active]
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
