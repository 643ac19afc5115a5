"""flexc: a declarative compression compiler for Mixture-of-Experts language models.

    import flexc
    spec = flexc.Spec.from_yaml("specs/quickstart.yaml")
    result = flexc.compile(spec, seed=1)
    model = flexc.load(result.out_dir / "nested", budget=0.5)
    model.set_budget(0.3)
"""

__version__ = "0.1.0"

from flexc.compiler import FlexcError, Spec, SpecError, compile, validate  # noqa: E402


def load(path, budget=None, **kwargs):
    """Load a compiled artifact as a transformers model (see :func:`flexc.runtime.load`)."""
    from flexc.runtime import load as _load

    return _load(path, budget, **kwargs)


__all__ = ["FlexcError", "Spec", "SpecError", "__version__", "compile", "load", "validate"]
