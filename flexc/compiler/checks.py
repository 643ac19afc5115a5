"""Checks of a parsed spec against the machine: does the model exist and is it MoE, can the
data files be read, can the pipeline's passes run in this order.

These run in ``flexc validate`` and at the start of ``flexc compile``; each problem becomes a
:class:`SpecIssue` positioned at the spec line it concerns.
"""

from __future__ import annotations

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


def check_model(spec: Spec) -> list[tuple[tuple, str, str]]:
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
    return []


def check_data(spec: Spec) -> list[tuple[tuple, str, str]]:
    out = []
    for role in ("calibration", "evaluation"):
        source = getattr(spec.data, role)
        if source is None or source.files is None:
            continue
        for i, name in enumerate(source.files):
            p = Path(name).expanduser()
            loc = ("data", role, "files", i)
            if not p.exists():
                out.append((loc, "value", f"data file not found: {p} (relative paths are taken from {Path.cwd()})"))
            elif not p.is_file():
                out.append((loc, "value", f"data file is not a regular file: {p}"))
            elif not os.access(p, os.R_OK):
                out.append((loc, "value", f"data file is not readable (permission denied): {p}"))
    return out


def check_pipeline_order(spec: Spec) -> list[tuple[tuple, str, str]]:
    if not spec.pipeline:
        return []
    try:
        from flexc.passes.manager import check_pipeline
    except ImportError:
        return []
    passes = [entry.build() for entry in spec.pipeline]
    try:
        check_pipeline(passes, initial_properties())
    except ValueError as exc:
        index = getattr(exc, "index", None)
        loc = ("pipeline", index) if isinstance(index, int) else ("pipeline",)
        return [(loc, "value", f"pass order: {exc}")]
    return []


def check_spec(spec: Spec, index: PositionIndex | None = None) -> list[SpecIssue]:
    """Every machine-dependent problem of ``spec``, positioned via ``index`` when given."""
    problems: list[tuple[tuple, str, str]] = []
    problems += check_model(spec)
    problems += check_data(spec)
    problems += check_pipeline_order(spec)
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
    path = Path(spec_or_path)
    return validate_file(path), path
