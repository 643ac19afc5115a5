"""flexc: a declarative compression compiler for Mixture-of-Experts language models.

    import flexc
    spec = flexc.Spec.from_yaml("specs/quickstart.yaml")
    result = flexc.compile(spec, seed=1)
"""

__version__ = "0.1.0"

from flexc.compiler import FlexcError, Spec, SpecError, compile, validate  # noqa: E402

__all__ = ["FlexcError", "Spec", "SpecError", "__version__", "compile", "validate"]
