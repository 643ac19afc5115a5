"""The ``flexc eval`` and ``flexc compare`` commands (argument handling and printing only)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from flexc.errors import FlexcError

MANIFEST = "flexc_manifest.json"


def evaluation_source(args):
    """The spec's ``data.evaluation`` with ``--spec``, else the builtin held-out split."""
    from flexc.compiler.spec import DataSource

    if args.spec:
        from flexc.compiler.checks import validate_file

        spec = validate_file(args.spec)
        if spec.data.evaluation is None:
            raise FlexcError(f"{args.spec} has no data.evaluation section to evaluate on")
        return spec.data.evaluation
    return DataSource(builtin="python-stdlib", split="heldout", num_samples=args.samples, seq_len=args.seq_len)


def _artifact(path: Path) -> Path | None:
    for candidate in (path, path / "nested", path / "sliced"):
        if (candidate / MANIFEST).is_file():
            return candidate
    return None


def _budgets(args, available: list[float], full: bool = True) -> list[float]:
    """Requested budgets; 'all' (the default) is every available one, plus full width if ``full``."""
    if not args.budget or args.budget == ["all"]:
        return sorted({*([1.0] if full else []), *available}, reverse=True)
    try:
        return [float(b) for b in args.budget]
    except ValueError:
        raise FlexcError(f"--budget takes keep ratios or 'all'; found {args.budget}") from None


def _models(path: Path, args, load) -> Iterator[tuple[str, float, object, object]]:
    """(label, budget, model, tokenizer) for each requested budget: a nested artifact switched
    in place, sliced checkpoints loaded one per budget, or a base model once."""
    from transformers import AutoTokenizer

    from flexc.export.nested import read_manifest
    from flexc.export.sliced import resolve_budget_dir

    artifact = _artifact(path) if path.is_dir() else None
    if artifact is None:
        from flexc import models
        from flexc.compiler.spec import ModelSpec

        resolved = models.resolve_argument(args.model)  # a clear error if it is nothing loadable
        if args.adaptive:
            raise FlexcError(f"--adaptive applies to nested artifacts compiled with adaptive_widths; {args.model} is a "
                             "base model")
        if args.budget:
            raise FlexcError(f"--budget applies to compiled artifacts (nested or sliced); {args.model} is a base model")
        loaded = models.load_model(ModelSpec(path=str(resolved)), progress=args.verbosity >= 0)
        yield args.model, 1.0, loaded.model, loaded.tokenizer
        return
    manifest = read_manifest(artifact)  # a clear error naming the file if it is not a JSON object
    if manifest.get("kind") == "sliced":
        if args.adaptive:
            raise FlexcError(f"--adaptive applies to nested artifacts; {artifact} is a sliced export (fixed widths)")
        available = [r["keep"] for r in manifest["budgets"]] if "budgets" in manifest else [manifest["budget"]]
        for b in _budgets(args, available, full=False):
            model = load(artifact, b)
            yield str(artifact), b, model, AutoTokenizer.from_pretrained(str(resolve_budget_dir(artifact, b)))
        return
    model = load(artifact)
    tokenizer = AutoTokenizer.from_pretrained(str(artifact))
    adaptive = args.adaptive
    if adaptive and model.flexc.policy is None:
        raise FlexcError(f"--adaptive: {artifact} has no token-adaptive policy (compile with the adaptive_widths pass; "
                         "docs/adaptive.md)")
    for b in _budgets(args, model.flexc.budgets):
        model.set_budget(b)
        yield str(artifact), b, model, tokenizer
        if adaptive and b != 1.0:
            model.set_budget(b, adaptive=True)
            yield f"{artifact} (adaptive)", b, model, tokenizer


def _tasks(args) -> list[str]:
    return [t.strip() for t in (args.tasks or "").split(",") if t.strip()]


def run_eval(args, console) -> dict[str, list[dict]]:
    """Held-out perplexity (unless --no-perplexity) and lm-eval tasks (with --tasks) per budget."""
    from flexc.eval.perplexity import evaluate, evaluation_stream
    from flexc.ir.tables import BudgetError
    from flexc.runtime import load

    tasks = _tasks(args)
    if args.no_perplexity and not tasks:
        raise FlexcError("--no-perplexity leaves nothing to evaluate; add --tasks")
    task_set = None
    if tasks:
        from flexc.eval import harness

        task_set = harness.task_set(tasks, include_path=args.include_path)  # checked before any model loads
    source = None if args.no_perplexity else evaluation_source(args)
    results: dict[str, list[dict]] = {"perplexity": [], "tasks": []}
    last = (None, None)  # (tokenizer, its tokenized evaluation stream): reused across a nested artifact's budgets
    try:
        for label, budget, model, tokenizer in _models(Path(args.model).expanduser(), args, load):
            if source is not None:
                if last[0] is not tokenizer:
                    last = (tokenizer, evaluation_stream(source, tokenizer))
                runtime = getattr(model, "flexc", None)
                if runtime is not None and getattr(runtime, "adaptive", False):  # its realised active keep too
                    with runtime.measure_active_keep() as keep:
                        r = evaluate(model, tokenizer, source, stream=last[1], progress=args.verbosity >= 0)
                    extra = {"adaptive": True, "active_keep": keep()}
                else:
                    r, extra = evaluate(model, tokenizer, source, stream=last[1], progress=args.verbosity >= 0), {}
                results["perplexity"].append({"model": label, "budget": budget, **r.to_dict(), **extra})
            if task_set is not None:
                lm = harness.harness_model(model, tokenizer, batch_size=args.batch_size, quiet=args.verbosity < 1)
                for row in harness.run_tasks(lm, task_set, limit=args.limit, num_fewshot=args.num_fewshot,
                                             quiet=args.verbosity < 1):
                    results["tasks"].append({"model": label, "budget": budget, **row})
    except BudgetError as exc:
        raise FlexcError(str(exc)) from None
    _print_results(results, source, console)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def _print_results(results: dict[str, list[dict]], source, console) -> None:
    from rich.table import Table

    if results["perplexity"]:
        table = Table(title=f"held-out perplexity ({source.seq_len}-token windows)")
        active = any("active_keep" in r for r in results["perplexity"])
        for col in ("model", "keep", *(("active keep",) if active else ()), "tokens", "loss", "perplexity"):
            table.add_column(col, justify="right" if col != "model" else "left")
        for r in results["perplexity"]:
            keep = (f"{r['active_keep']:.3f}" if "active_keep" in r else "",) if active else ()
            table.add_row(r["model"], f"{r['budget']:g}", *keep, str(r["tokens"]), f"{r['loss']:.4f}",
                          f"{r['perplexity']:.3f}")
        console.print(table)
    if results["tasks"]:
        table = Table(title="lm-eval-harness tasks")
        for col in ("model", "keep", "task", "metric", "value", "± stderr"):
            table.add_column(col, justify="left" if col in ("model", "task", "metric") else "right")
        for r in results["tasks"]:
            table.add_row(r["model"], f"{r['budget']:g}", r["task"], r["metric"], f"{r['value']:.4f}",
                          "" if r["stderr"] is None else f"{r['stderr']:.4f}")
        console.print(table)


def run_compare(args, console) -> dict:
    from flexc.compiler.driver import output_dir
    from flexc.compiler.compare import compare, load_spec_or_run, parse_quantize
    from flexc.passes.methods import parse_methods

    spec, run = load_spec_or_run(args.spec)  # a spec file, or a compile's output directory
    try:
        methods = parse_methods(args.methods, spec)
        quantize = parse_quantize(args.quantize, spec) if args.quantize else []
    except ValueError as exc:
        raise FlexcError(str(exc)) from None
    source = None if run is not None else Path(args.spec)
    out = Path(args.out).expanduser() if args.out else (run or output_dir(spec, source, None)) / "compare"
    result = compare(spec, methods, out, quiet=args.verbosity < 0, run=run, recover=args.recover, quantize=quantize,
                     adaptive=args.adaptive)
    console.print((out / "compare.md").read_text(), highlight=False, soft_wrap=True)
    console.print(f"[green]✓[/] {out}/compare.json, compare.md, compare.png", highlight=False, soft_wrap=True)
    return result
