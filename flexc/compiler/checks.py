"""Checks of a parsed spec against the machine, so that no mistake surfaces after minutes of work.

- model: exists, is a supported MoE model, config.json is a JSON object, weight files are whole
  (safetensors headers against file sizes), the device exists here;
- data: files are non-empty UTF-8 text whose first records carry the text field, hold enough
  text for num_samples x seq_len, seq_len fits max_position_embeddings; hub datasets are cached;
- pipeline: pass order; each pass has what it reads (calibration data and a tokenizer, budgets,
  a kernel backend, rank_channels' ``from:`` file); budgets are reachable by the width passes;
- exports: width tables for nested/sliced/onnx, no whole-expert pruning where it cannot be
  expressed, optional packages installed.

They read configs, file headers and first records only, never weights. They run in ``flexc
validate`` and at the start of ``flexc compile`` (before the output directory is touched); each
problem becomes a :class:`SpecIssue` positioned at the spec line it concerns.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from flexc.compiler.errors import FlexcError, SpecError, SpecIssue
from flexc.compiler.spec import Spec, locate, parse_spec, read_spec_text
from flexc.compiler.yamlpos import PositionIndex


def initial_properties() -> frozenset[str]:
    """Graph properties that hold right after lowering (before any pass)."""
    try:
        from flexc.passes import manager
    except ImportError:
        manager = None
    return frozenset(getattr(manager, "INITIAL_PROPERTIES", None) or {"lowered"})


Problem = tuple[tuple, str, str]  # (spec path, "key" or "value", message)

#: Export formats that write width tables, and what the optional ones need installed.
WIDTH_EXPORTS = ("nested", "sliced", "onnx")
EXPORT_PACKAGES = {"onnx": ("onnx", "onnxruntime", "onnxscript")}


def check_model(spec: Spec) -> list[Problem]:
    """The model exists, is a supported MoE model, and its weight files are whole (headers only)."""
    from flexc import models

    kind, value = spec.model.source
    loc = ("model", kind)
    try:
        if kind == "zoo":
            msg = models.check_zoo_name(value)
            return [(loc, "value", msg)] if msg else []
        directory = models.resolve_directory(spec.model)
        models.check_moe_config(directory)
    except FlexcError as exc:
        return [(loc, "value", str(exc))]
    return [(loc, "value", msg) for msg in models.check_weight_files(directory)]


def check_device(spec: Spec) -> list[Problem]:
    if spec.model.device == "cpu":
        return []
    from flexc import models

    try:
        models.spec_device(spec.model)
    except FlexcError as exc:
        return [(("model", "device"), "value", str(exc))]
    return []


def check_data(spec: Spec, shape=None) -> list[Problem]:
    """Data files exist and their first records are usable text; sequences fit the model."""
    from flexc.data.files import approx_max_tokens, check_data_file

    out = []
    for role in ("calibration", "evaluation"):
        source = getattr(spec.data, role)
        if source is None:
            continue
        limit = getattr(shape, "max_positions", None)
        if limit and source.seq_len > limit:
            out.append((("data", role, "seq_len"), "value",
                        f"seq_len {source.seq_len} is longer than the model's max_position_embeddings {limit} "
                        f"({shape.config_file}); expected at most {limit}"))
        if source.hub is not None:
            out += _hub_dataset_problems(source, role)
        if source.files is None:
            continue
        readable = []
        for i, name in enumerate(source.files):
            p = Path(name).expanduser()
            loc = ("data", role, "files", i)
            if not p.exists():
                out.append((loc, "value", f"data file not found: {p} (relative paths are taken from {Path.cwd()}); "
                            "expected a .txt, .jsonl, .json or .parquet file"))
            elif not p.is_file():
                out.append((loc, "value", f"data file is not a regular file: {p}; expected a .txt, .jsonl, .json or "
                            ".parquet file"))
            elif not os.access(p, os.R_OK):
                out.append((loc, "value", f"data file is not readable (permission denied): {p}"))
            elif msg := check_data_file(p, source.text_field, role):
                out.append((loc, "value", msg))
            else:
                readable.append(p)
        needed = source.num_samples * source.seq_len
        if len(readable) == len(source.files) and not any(p.suffix.lower() == ".parquet" for p in readable):
            most = approx_max_tokens(readable)
            if most < needed:  # cannot be met whatever the tokenizer: fail now, not after loading the model
                out.append((("data", role, "num_samples"), "value",
                            f"num_samples {source.num_samples} x seq_len {source.seq_len} = {needed:,} tokens, but "
                            f"the files hold at most ~{most:,}; lower num_samples or seq_len, or add text"))
    return out


def _hub_dataset_problems(source, role: str) -> list[Problem]:
    """A hub dataset must be in the local datasets cache (flexc never downloads), with the split asked for."""
    from flexc import models

    models._offline()
    try:
        import datasets

        builder = datasets.load_dataset_builder(source.hub, source.config)
    except ImportError:  # pragma: no cover - datasets is a dependency
        return []
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds for a dataset it cannot find offline
        return [(("data", role, "hub"), "value", f"dataset {source.hub!r} (config {source.config!r}) is not in the "
                 f"local datasets cache, and flexc runs offline ({type(exc).__name__}: {str(exc)[:200]})")]
    splits = list(getattr(builder.info, "splits", None) or ())
    split = source.resolved_split(role)
    if splits and split not in splits:
        return [(("data", role, "split"), "value", f"dataset {source.hub!r} has no split {split!r}; "
                 f"its splits: {', '.join(splits)}")]
    return []


def check_pipeline_order(spec: Spec) -> list[Problem]:
    if not spec.pipeline:
        return []
    try:
        from flexc.passes.manager import check_pipeline
    except ImportError:
        return []
    passes = [entry.build() for entry in spec.pipeline]
    first: dict[str, int] = {}
    for i, p in enumerate(passes):  # a built-in pass twice re-ranks, re-gates or re-folds what it did
        if type(p).__module__.startswith("flexc.passes.") and first.setdefault(p.name, i) != i:
            return [(("pipeline", i), "value", f"pass {p.name!r} is listed twice (pipeline[{first[p.name]}] and "
                     f"pipeline[{i}]); a built-in pass runs once: remove one")]
    try:
        check_pipeline(passes, initial_properties())
    except ValueError as exc:
        index = getattr(exc, "index", None)
        loc = ("pipeline", index) if isinstance(index, int) else ("pipeline",)
        return [(loc, "value", f"pass order: {exc}")]
    return []


def check_pass_inputs(spec: Spec, shape=None) -> list[Problem]:
    """Every pass has what it reads: calibration data (and a tokenizer for it), budgets, optional
    packages, and what the pass itself checks (:meth:`flexc.passes.base.Pass.check_spec`)."""
    from flexc.compiler.spec import calibration_passes
    from flexc.passes.base import SpecSite

    out = []
    needing = calibration_passes(spec.pipeline)
    for i in needing:
        name = spec.pipeline[i].name
        if spec.data.calibration is None:
            out.append((("pipeline", i), "value",
                        f"pass {name!r} reads calibration data, and the spec has none: set data.calibration "
                        "(e.g. {builtin: python-stdlib} or {files: [my.jsonl]})"))
    directory = getattr(shape, "directory", None)
    if needing and directory is not None:
        out += _tokenizer_problems(spec, directory, spec.pipeline[needing[0]].name)
    device = _resolved_device(spec)
    for i, entry in enumerate(spec.pipeline):
        options, cls = entry.pass_options, entry.pass_class
        missing = [m for m in cls.packages if importlib.util.find_spec(m) is None]
        if missing:
            out.append((("pipeline", i), "value", f"pass {entry.name!r} needs {', '.join(missing)}, not installed "
                        f"here: pip install 'flexc[{entry.name}]'"))
        out += [(loc, "value", msg) for loc, msg in cls.check_spec(options, SpecSite(spec, i, shape, device))]
        if "budgets" in type(options).model_fields and options.budgets is None and spec.budgets is None:
            out.append((("pipeline", i), "value",
                        f"pass {entry.name!r} needs budgets: set budgets.keep in the spec or the pass's budgets option"))
        topk, vocab = getattr(options, "teacher_topk", None), getattr(shape, "vocab_size", None)
        if isinstance(topk, int) and isinstance(vocab, int) and topk > vocab:
            out.append((("pipeline", i, entry.name, "teacher_topk"), "value",
                        f"teacher_topk {topk} exceeds the vocabulary ({vocab} tokens, {shape.config_file}); expected "
                        f"at most {vocab}, or null for the whole distribution"))
    return out


def _resolved_device(spec: Spec) -> str | None:
    """The device ``model.device`` names here ("auto": CUDA where there is one); None when it does not."""
    from flexc import models

    try:
        return models.spec_device(spec.model)
    except FlexcError:
        return None  # check_device reports it


def _tokenizer_problems(spec: Spec, directory: Path, pass_name: str) -> list[Problem]:
    """Calibration text needs the model's tokenizer, with an end-of-text token between documents."""
    from flexc import models

    loc = ("model", spec.model.source[0])
    if not models.has_tokenizer(directory):
        return [(loc, "value", f"{directory} has no tokenizer files ({', '.join(models.TOKENIZER_FILES)}), and "
                 f"pass {pass_name!r} tokenizes calibration text; save the tokenizer beside the model")]
    tokenizer = models.load_tokenizer(directory)  # no weights: a few files of vocabulary
    if tokenizer is None:
        return [(loc, "value", f"the tokenizer in {directory} cannot be loaded (run with --verbose for why), and "
                 f"pass {pass_name!r} tokenizes calibration text; expected the model's tokenizer files as "
                 "save_pretrained writes them")]
    if getattr(tokenizer, "eos_token_id", None) is None:
        return [(loc, "value", f"the tokenizer in {directory} has no end-of-text token (eos_token), which "
                 f"calibration uses to separate documents for pass {pass_name!r}; set eos_token in tokenizer_config.json")]
    return []


def _spec_budget_loc(spec: Spec, keep: float) -> tuple:
    """Where a keep ratio of the spec's budgets is written (a prune ratio for ``prune:`` lists)."""
    b = spec.budgets
    values, kind = (b.keep, "keep") if b.keep is not None else ([round(1 - p, 12) for p in b.prune or ()], "prune")
    return ("budgets", kind, values.index(keep)) if keep in values else ("budgets",)


def check_budget_floor(spec: Spec, shape) -> list[Problem]:
    """Budgets below the lowest keep a width pass can reach (:meth:`flexc.passes.base.Pass.keep_floor`)."""
    if shape is None:
        return []
    metric = spec.budgets.metric if spec.budgets is not None else "params"
    out = []
    for i, entry in enumerate(spec.pipeline):
        floor = entry.pass_class.keep_floor(entry.pass_options, shape, metric)
        if floor is None:
            continue
        lowest, why = floor
        budgets, where = spec.budgets_for(i)
        low = [b for b in budgets if b < lowest - 1e-9]
        if low:
            loc = where or _spec_budget_loc(spec, low[0])
            out.append((loc, "value", f"keep {low[0]:g} is below {lowest:.3g}, the lowest keep reachable: {why}"))
    return out


def check_exports(spec: Spec) -> list[Problem]:
    """Each export has what it reads: width tables without whole-expert pruning, installed packages."""
    holds = set(initial_properties())
    passes = [entry.build() for entry in spec.pipeline]
    pruning = [p.name for p in passes if p.prunes_whole_experts]
    for p in passes:
        holds |= set(p.guarantees)
    # flexc's passes declare the width tables they write; a pass of your own may write them undeclared
    only_flexc = all(type(p).__module__.startswith("flexc.") for p in passes)
    out = []
    for i, fmt in enumerate(spec.export.formats):
        loc = ("export", "formats", i)
        if fmt in WIDTH_EXPORTS and "width_tables" not in holds and only_flexc:
            out.append((loc, "value", f"the {fmt} export writes one model per budget and needs width tables; no pass "
                        "in the pipeline chooses widths: add anneal (after rank_channels and insert_action_gates) "
                        "or a baseline (uniform, coverage) after rank_channels"))
        elif fmt in WIDTH_EXPORTS + ("hf",) and pruning:
            out.append((loc, "value", f"the {fmt} export cannot express whole-expert pruning ({pruning[0]} re-routes "
                        "tokens through router masks); drop it from export.formats or use a width pass"))
        elif fmt == "graph" and not spec.pipeline:
            out.append((loc, "value", "the graph export draws the lowered graph, and an empty pipeline never lowers "
                        "the model; add a pass or drop graph"))
        missing = [m for m in EXPORT_PACKAGES.get(fmt, ()) if importlib.util.find_spec(m) is None]
        if missing:
            out.append((loc, "value", f"the {fmt} export needs {', '.join(missing)}, not installed here: "
                        f"pip install 'flexc[{fmt}]'"))
    return out


def check_spec(spec: Spec, index: PositionIndex | None = None) -> list[SpecIssue]:
    """Every machine-dependent problem of ``spec``, positioned via ``index`` when given.

    Only configs, file headers and first records are read: a mistake is reported before any
    weight loads, and before the output directory is touched.
    """
    from flexc import models

    problems: list[Problem] = check_model(spec)
    shape = None
    if not problems:
        try:
            shape = models.model_shape(spec.model)
        except FlexcError as exc:
            problems.append((("model", spec.model.source[0]), "value", str(exc)))
    problems += check_device(spec)
    problems += check_data(spec, shape)
    order = check_pipeline_order(spec)
    problems += order
    if not order:  # later checks assume a pipeline that can run
        problems += check_pass_inputs(spec, shape)
        problems += check_budget_floor(spec, shape)
    problems += check_exports(spec)
    return [locate(loc, msg, index, at) for loc, at, msg in problems]


def validate_file(path: str | Path) -> Spec:
    """Parse and check a spec file; raise :class:`SpecError` with every problem found."""
    text = read_spec_text(path)
    spec, index = parse_spec(text, str(path))
    issues = check_spec(spec, index)
    if issues:
        raise SpecError(issues, str(path), text)
    return spec


def validate_spec(spec: Spec, filename: str | None = None) -> Spec:
    """Check a spec built in Python (no positions)."""
    issues = check_spec(spec)
    if issues:
        raise SpecError(issues, filename)
    return spec


def load(spec_or_path: Any) -> tuple[Spec, Path | None]:
    """A checked spec from a :class:`Spec`, a mapping, or a path to a YAML file."""
    if isinstance(spec_or_path, Spec):
        return validate_spec(spec_or_path), None
    if isinstance(spec_or_path, dict):
        from pydantic import ValidationError

        from flexc.compiler.spec import issues_from_errors

        try:
            spec = Spec.model_validate(spec_or_path)
        except ValidationError as exc:
            raise SpecError(issues_from_errors(exc.errors(), None)) from None
        return validate_spec(spec), None
    if not isinstance(spec_or_path, (str, os.PathLike)):
        raise TypeError(f"expected a flexc.Spec, a mapping or the path of a YAML spec; found "
                        f"{type(spec_or_path).__name__}")
    path = Path(spec_or_path)
    return validate_file(path), path
