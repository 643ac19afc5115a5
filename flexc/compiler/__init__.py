"""The compiler front and back: the spec, its checks, the driver and the output directory."""

from flexc.compiler.errors import FlexcError, SpecError, SpecIssue
from flexc.compiler.spec import BudgetSpec, DataSource, DataSpec, ExportSpec, ModelSpec, PassEntry, Spec

__all__ = [
    "BudgetSpec",
    "DataSource",
    "DataSpec",
    "ExportSpec",
    "FlexcError",
    "ModelSpec",
    "PassEntry",
    "Spec",
    "SpecError",
    "SpecIssue",
    "compile",
    "validate",
]


def compile(spec_or_path, **kwargs):  # noqa: A001 - the verb users expect
    """Compile a spec; see :func:`flexc.compiler.driver.compile`."""
    from flexc.compiler.driver import compile as _compile

    return _compile(spec_or_path, **kwargs)


def validate(spec_or_path):
    """Parse and check a spec (file, mapping or :class:`Spec`); raise :class:`SpecError` if invalid."""
    from flexc.compiler.checks import load

    return load(spec_or_path)[0]
