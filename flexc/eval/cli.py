"""The ``flexc eval`` and ``flexc compare`` commands (argument handling and printing only)."""

from __future__ import annotations

import json
from pathlib import Path

from flexc.compiler.errors import FlexcError

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


def _eval_artifact(artifact: Path, args, source, load) -> list[dict]:
    """Perplexity of a nested artifact at each requested budget (switched in place), or of
    sliced checkpoints (one load per budget)."""
    from transformers import AutoTokenizer

    from flexc.eval.perplexity import evaluate, evaluation_stream
    from flexc.export.sliced import resolve_budget_dir

    manifest = json.loads((artifact / MANIFEST).read_text())
    rows = []
    if manifest.get("kind") == "sliced":
        available = [r["keep"] for r in manifest["budgets"]] if "budgets" in manifest else [manifest["budget"]]
        for b in _budgets(args, available, full=False):
            model = load(artifact, b)
            tokenizer = AutoTokenizer.from_pretrained(str(resolve_budget_dir(artifact, b)))
            r = evaluate(model, tokenizer, source, progress=args.verbosity >= 0)
            rows.append({"model": str(artifact), "budget": b, **r.to_dict()})
        return rows
    model = load(artifact)
    tokenizer = AutoTokenizer.from_pretrained(str(artifact))
    stream = evaluation_stream(source, tokenizer)
    for b in _budgets(args, model.flexc.budgets):
        model.set_budget(b)
        r = evaluate(model, tokenizer, source, stream=stream, progress=args.verbosity >= 0)
        rows.append({"model": str(artifact), "budget": b, **r.to_dict()})
    return rows


def run_eval(args, console) -> list[dict]:
    from rich.table import Table

    from flexc.eval.perplexity import evaluate

    source = evaluation_source(args)
    path = Path(args.model).expanduser()
    artifact = _artifact(path) if path.is_dir() else None
    rows = []
    if artifact is not None:
        from flexc.export.tables import BudgetError
        from flexc.runtime import load

        try:
            rows = _eval_artifact(artifact, args, source, load)
        except BudgetError as exc:
            raise FlexcError(str(exc)) from None
    else:
        from flexc import models
        from flexc.compiler.spec import ModelSpec

        if args.budget:
            raise FlexcError("--budget applies to compiled artifacts; this is a base model")
        loaded = models.load_model(ModelSpec(path=str(models.resolve_argument(args.model))),
                                   progress=args.verbosity >= 0)
        r = evaluate(loaded.model, loaded.tokenizer, source, progress=args.verbosity >= 0)
        rows.append({"model": args.model, "budget": 1.0, **r.to_dict()})
    table = Table(title=f"held-out perplexity ({source.seq_len}-token windows)")
    for col in ("model", "keep", "tokens", "loss", "perplexity"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for r in rows:
        table.add_row(r["model"], f"{r['budget']:g}", str(r["tokens"]), f"{r['loss']:.4f}", f"{r['perplexity']:.3f}")
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def run_compare(args, console) -> dict:
    from flexc.compiler.checks import validate_file
    from flexc.eval.compare import compare, parse_methods

    spec = validate_file(args.spec)
    try:
        methods = parse_methods(args.methods, spec)
    except ValueError as exc:
        raise FlexcError(str(exc)) from None
    out = Path(args.out) if args.out else Path(spec.export.dir) / "compare"
    result = compare(spec, methods, out, quiet=args.verbosity < 0)
    console.print((out / "compare.md").read_text(), highlight=False, soft_wrap=True)
    console.print(f"[green]✓[/] {out}/compare.json, compare.md, compare.png", highlight=False, soft_wrap=True)
    return result
