"""The ``flexc`` command line.

    flexc compile SPEC [--out DIR] [--force] [--dump-graphs] [--quiet|--verbose]
    flexc validate SPEC
    flexc schema
    flexc inspect MODEL [--graph OUT.svg] | flexc inspect --families
    flexc zoo list | flexc zoo build NAME [--force]
    flexc eval MODEL|ARTIFACT [--spec SPEC] [--budget B ...] [--tasks T,...] [--json OUT]
    flexc compare SPEC --methods flexmoe,uniform,coverage,expert_prune:man [--out DIR] [--recover] [--quantize w4a16] [--adaptive]
    flexc serve ARTIFACT [--budget KEEP] [--per-request-budgets] [--host H] [--port P] [--dry-run] [-- VLLM ARGS...]

User errors print one clear message (no traceback unless --verbose) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import traceback
from pathlib import Path
from typing import Sequence

from flexc import __version__
from flexc.compiler import logs
from flexc.compiler.errors import FlexcError, SpecError

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_INTERRUPTED = 0, 1, 2, 130

log = logging.getLogger("flexc")


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Errors from other flexc modules that mean 'the user asked for something impossible'."""
    types: list[type[BaseException]] = [FlexcError]
    for module, name in (
        ("flexc.passes.registry", "UnknownPassError"),
        ("flexc.ir.families", "UnsupportedModelError"),
        ("flexc.zoo", "UnknownZooModel"),
        ("flexc.passes.manager", "PipelineOrderError"),
        ("flexc.data.calibration", "DataError"),
        ("flexc.ir.tables", "BudgetError"),  # a budget the artifact does not have
    ):
        mod = sys.modules.get(module)
        cls = getattr(mod, name, None) if mod is not None else None
        if isinstance(cls, type):
            types.append(cls)
    return tuple(types)


# --------------------------------------------------------------------------- commands


def _check_port(port: int | None) -> None:
    if port is not None and not 1 <= port <= 65535:
        raise FlexcError(f"--port {port}: a TCP port must be between 1 and 65535 (vLLM's default is 8000); "
                         "choose a port in that range")


def _graph_target(graph: str) -> Path:
    """The path ``--graph`` names, checked writable before any model loads (a probe file in its folder)."""
    import tempfile

    target = Path(graph).expanduser()
    if target.is_dir():
        raise FlexcError(f"--graph {graph}: {target} is a directory; expected the path of an SVG file to write "
                         "(e.g. graph.svg)")
    folder = target.parent
    if not folder.is_dir():
        what = "is not a directory" if folder.exists() else "does not exist"
        raise FlexcError(f"--graph {graph}: the output folder {folder} {what}; expected an SVG path in an "
                         "existing, writable folder: create it or choose another path")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise FlexcError(f"--graph {graph}: the output folder {folder} is not writable ({exc.strerror or exc}); "
                         "expected an SVG path in a writable folder: choose another path") from None
    return target


def cmd_serve(args: argparse.Namespace) -> int:
    from flexc.serving.launch import serve

    _check_port(args.port)
    cmd = serve(args.artifact, budget=args.budget, host=args.host, port=args.port, extra=args.rest,
                dry_run=args.dry_run, per_request=args.per_request_budgets, experts_kernel=args.experts_kernel)
    print(" ".join(shlex.quote(part) for part in cmd))  # dry run only: serve() replaced this process otherwise
    return EXIT_OK


def cmd_compile(args: argparse.Namespace) -> int:
    from flexc.compiler.driver import compile as run_compile
    from flexc.utils.distributed import launched_rank

    if launched_rank() > 0:  # under torchrun rank 0 logs the stages and prints the summary; the others warn
        args.verbosity = min(args.verbosity, -1)
        logs.setup(args.verbosity)
    result = run_compile(
        args.spec, out=args.out, force=args.force, dump_graphs=args.dump_graphs, quiet=args.verbosity < 0
    )
    if args.verbosity >= 0:
        _print_compile_summary(result, logs.out_console())
    return EXIT_OK


def _print_compile_summary(result, console) -> None:
    """What a user wants after a compile: per budget the keep reached, the size and the held-out
    perplexity (report.py stores them in the manifest's ``summary``), then where the report is."""
    from rich.table import Table

    from flexc.compiler.report import _fmt_bytes, _fmt_count

    what = "up to date" if result.up_to_date else f"ran {', '.join(result.ran)}"
    console.print(f"[green]✓[/] {result.out_dir}  ({what})", highlight=False, soft_wrap=True)
    summary = result.manifest.get("summary") or {}
    rows = summary.get("budgets") or []
    if rows:
        with_ppl = any(r.get("perplexity") is not None for r in rows)
        metric = summary.get("metric", "params")
        table = Table(title="budgets (keep = fraction of routed-expert parameters kept)", title_justify="left")
        target = "keep (target, flops)" if metric == "flops" else "keep (target)"
        for col in (target, "keep (achieved)", "parameters", "size") + (
                ("held-out ppl",) if with_ppl else ()):
            table.add_column(col, justify="right")
        for r in rows:
            ppl = r.get("perplexity")
            cells = ["1 (unpruned)" if r["keep"] == 1.0 and r is rows[0] else f"{r['keep']:g}",
                     f"{r['keep_achieved']:.3f}", _fmt_count(int(r["total_params"])), _fmt_bytes(int(r["bytes"]))]
            table.add_row(*cells, *((f"{ppl:.2f}" if ppl is not None else "–",) if with_ppl else ()))
        console.print(table)
    report = result.out_dir / summary.get("report", "report.md")
    if report.is_file():
        console.print(f"report: {report}", highlight=False, soft_wrap=True)


def cmd_validate(args: argparse.Namespace) -> int:
    from flexc.compiler.checks import validate_file

    spec = validate_file(args.spec)
    kind, value = spec.model.source
    budgets = f"{len(spec.budgets.keep_ratios)} budget(s)" if spec.budgets else "no budgets"
    logs.out_console().print(
        f"[green]✓[/] {args.spec} is valid: model {kind}={value}, {budgets}, "
        f"{len(spec.pipeline)} pass(es), exports: {', '.join(spec.export.formats) or 'none'}",
        highlight=False,
        soft_wrap=True,
    )
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from flexc.compiler.spec import Spec

    schema = Spec.model_json_schema()
    schema.setdefault("$schema", "https://json-schema.org/draft/2020-12/schema")
    schema.setdefault("title", "flexc compile spec")
    sys.stdout.write(json.dumps(schema, indent=args.indent) + "\n")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    console = logs.out_console()
    if args.families:
        from flexc.ir.inspect import render_families

        render_families(console)
        if args.model is None:
            return EXIT_OK
    if args.model is None:
        raise FlexcError("inspect needs a MODEL (a zoo name, a model directory or a cached hub id), or --families")
    graph = _graph_target(args.graph) if args.graph is not None else None  # before minutes of loading
    from flexc import models
    from flexc.compiler.spec import ModelSpec
    from flexc.ir import inspect as ir_inspect

    directory = models.resolve_argument(args.model)
    loaded = models.load_model(ModelSpec(path=str(directory)), progress=args.verbosity >= 0)
    summary = ir_inspect.summarize(loaded.model)
    ir_inspect.render_summary(summary, console)
    if graph is not None:
        from flexc.ir import lower
        from flexc.ir.draw import write_svg

        module = lower(loaded.model).module
        try:
            written = write_svg(module, graph)
        except OSError as exc:  # e.g. the disk filled, or the folder changed since the check
            raise FlexcError(f"--graph {args.graph}: cannot write {graph} ({exc.strerror or exc}); "
                             "choose another path") from None
        console.print(f"graph drawn to {written}", highlight=False, soft_wrap=True)
    return EXIT_OK


def cmd_zoo(args: argparse.Namespace) -> int:
    from flexc import zoo

    console = logs.out_console()
    if args.zoo_command == "list":
        from rich.table import Table

        table = Table(title="flexc model zoo")
        for col in ("name", "built", "description", "path"):
            table.add_column(col)
        for e in zoo.available():
            table.add_row(e.name, "yes" if e.cached else "no", e.description, str(e.path) if e.cached else "")
        console.print(table)
        return EXIT_OK
    path = zoo.build(args.name, force=args.force, progress=args.verbosity >= 0)
    console.print(f"[green]✓[/] zoo model {args.name!r} at {path}", highlight=False, soft_wrap=True)
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from flexc.cli_eval import run_eval

    run_eval(args, logs.out_console())
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from flexc.cli_eval import run_compare

    run_compare(args, logs.out_console())
    return EXIT_OK


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    def verbosity_options(p: argparse.ArgumentParser) -> None:
        # SUPPRESS: a subcommand that is not given -q/-v keeps what `flexc -q COMMAND` set.
        g = p.add_mutually_exclusive_group()
        g.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=argparse.SUPPRESS,
                       help="only warnings and errors, no progress bars")
        g.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                       default=argparse.SUPPRESS, help="debug logs, tracebacks")

    common = argparse.ArgumentParser(add_help=False)
    verbosity_options(common)

    parser = argparse.ArgumentParser(
        prog="flexc", description="A declarative compression compiler for Mixture-of-Experts language models."
    )
    verbosity_options(parser)
    parser.add_argument("--version", action="version", version=f"flexc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("compile", parents=[common], help="run a spec: load, passes, exports")
    p.add_argument("spec", help="spec file (YAML)")
    p.add_argument("--out", help="output directory (overrides export.dir)")
    p.add_argument("--force", action="store_true", help="replace a non-flexc or different-spec output directory")
    p.add_argument("--dump-graphs", action="store_true", help="write the graph code after lowering and each pass")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("validate", parents=[common], help="check a spec without running it")
    p.add_argument("spec", help="spec file (YAML)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", parents=[common], help="print the spec's JSON Schema")
    p.add_argument("--indent", type=int, default=2)
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("inspect", parents=[common], help="print a model's MoE structure")
    p.add_argument("model", nargs="?", help="zoo name, model directory, or hub id in the local cache")
    p.add_argument("--families", action="store_true", help="list the supported MoE families")
    p.add_argument("--graph", metavar="OUT.svg", help="also draw the lowered graph")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("zoo", parents=[common], help="the offline reference models")
    zsub = p.add_subparsers(dest="zoo_command", metavar="list|build", required=True)
    zsub.add_parser("list", parents=[common], help="list zoo models")
    zb = zsub.add_parser("build", parents=[common], help="build (train) a zoo model")
    zb.add_argument("name")
    zb.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=cmd_zoo)

    _add_eval_commands(sub, common)
    _add_serve_command(sub, common)

    parser.set_defaults(verbosity=0)
    return parser


def _add_eval_commands(sub, common: argparse.ArgumentParser) -> None:
    """``flexc eval`` and ``flexc compare``."""
    p = sub.add_parser("eval", parents=[common], help="held-out perplexity and lm-eval tasks of a model or a compiled artifact")
    p.add_argument("model", help="zoo name, model directory, cached hub id, or a flexc artifact (nested/sliced)")
    p.add_argument("--spec", help="take the evaluation data (data.evaluation) from this spec")
    p.add_argument("--budget", action="append", help="keep ratio of a nested artifact, or 'all' (repeatable)")
    p.add_argument("--samples", type=int, default=64, help="windows to score without --spec (default 64)")
    p.add_argument("--seq-len", type=int, default=128, help="window length without --spec (default 128)")
    p.add_argument("--no-perplexity", action="store_true", help="skip held-out perplexity (with --tasks)")
    p.add_argument("--tasks", help="lm-eval-harness tasks, comma-separated: registry names or task YAML files "
                   "(needs the eval extra: pip install 'flexc[eval]')")
    p.add_argument("--include-path", help="directory of extra lm-eval task YAMLs")
    p.add_argument("--limit", type=float, help="documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per document (default: the task's)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    p.add_argument("--adaptive", action="store_true",
                   help="a nested artifact compiled with adaptive_widths: also each budget on its token-adaptive "
                        "policy, with the realised active keep (docs/adaptive.md)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", parents=[common], help="compare pruning methods on a spec's model and budgets")
    p.add_argument("spec", help="spec file (YAML), or a compile's output directory (its ranking and tables are reused)")
    p.add_argument("--methods", default="flexmoe,uniform,coverage,expert_prune:man",
                   help="comma-separated: flexmoe, uniform, coverage, expert_prune[:criterion]")
    p.add_argument("--out", help="output directory (default: <the run's output directory>/compare)")
    p.add_argument("--recover", action="store_true",
                   help="also show every method after one recover (the spec's recover options; without a recover "
                        "entry, the defaults at the budget nearest keep 0.6)")
    p.add_argument("--quantize", metavar="SCHEME[:METHOD[:GROUP]],...",
                   help="also show every method (and its recover) after quantize, e.g. w4a16:gptq:128,w8a16:rtn "
                        "(what an entry leaves out: the spec's quantize options, else the pass's defaults)")
    p.add_argument("--adaptive", action="store_true",
                   help="also show every method (and its recover) with a token-adaptive width policy "
                        "(adaptive_widths: the spec's options, else its defaults); rows METHOD+adaptive give the "
                        "realised active keep beside the static table's")
    p.set_defaults(func=cmd_compare)


def _add_serve_command(sub, common: argparse.ArgumentParser) -> None:
    """``flexc serve``: vLLM's OpenAI-compatible server on a flexc artifact."""
    p = sub.add_parser("serve", parents=[common], help="serve a nested artifact or sliced checkpoint with vLLM "
                       "(OpenAI-compatible server; the budget switchable at /flexc/budget)")
    p.add_argument("artifact", help="a flexc nested artifact (e.g. runs/quickstart/nested) or sliced checkpoint")
    p.add_argument("--budget", type=float, help="nested: the exported keep ratio to start at (default: full width)")
    p.add_argument("--host", help="address to listen on (vLLM's default otherwise)")
    p.add_argument("--port", type=int, help="port to listen on (vLLM's default otherwise: 8000)")
    p.add_argument("--per-request-budgets", action="store_true",
                   help="nested: each request may name its budget (vllm_xargs: {\"flexc_budget\": KEEP}); requests of "
                        "different budgets share batches (prefix caching off)")
    p.add_argument("--experts-kernel", choices=("vllm", "flexc"),
                   help="nested, on CPU: what runs the budget the engine is at. vllm (default): vLLM's CPU experts "
                        "kernel on a copy of the kept channels, packed at each switch (faster; more memory, slower "
                        "switches); flexc: flexc's op on the nested weights (no copy)")
    p.add_argument("--dry-run", action="store_true", help="check the artifact and print vLLM's command, do not run it")
    p.set_defaults(func=cmd_serve, passthrough=True)
    p.epilog = "Arguments after -- go to vLLM's server unchanged (e.g. -- --dtype float32 --max-model-len 4096)."


def _print_error(exc: BaseException, verbosity: int) -> None:
    console = logs.console()
    if verbosity > 0:
        console.print("".join(traceback.format_exception(exc)), markup=False, highlight=False, style="dim")
    if isinstance(exc, SpecError):
        text = exc.render()
    else:
        text = f"error: {exc}"
    console.print(text, markup=False, highlight=False, style="red", soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []  # for a wrapped program (flexc serve: vLLM)
    args = parser.parse_args(argv[: len(argv) - len(rest) - 1] if "--" in argv else argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"arguments after -- are passed to vLLM by 'flexc serve' only; found: {' '.join(rest)}")
    args.rest = rest
    if args.verbosity is None:
        args.verbosity = 0
    logs.setup(args.verbosity)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        logs.console().print("interrupted", style="red")
        return EXIT_INTERRUPTED
    except _user_error_types() as exc:
        _print_error(exc, args.verbosity)
        return EXIT_USER
    except Exception as exc:  # noqa: BLE001 - last resort: say what broke and how to see more
        if args.verbosity > 0:
            _print_error(exc, args.verbosity)
        else:
            logs.console().print(
                f"internal error: {type(exc).__name__}: {exc}\n"
                + "".join(f"{note}\n" for note in getattr(exc, "__notes__", ()))  # e.g. which pass failed
                + "(run again with --verbose for the traceback)",
                markup=False,
                highlight=False,
                style="red",
            )
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
