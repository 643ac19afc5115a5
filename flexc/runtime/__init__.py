"""Serving compiled artifacts: :func:`load` a nested artifact (any budget, switchable in place)
or a sliced checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flexc.runtime.nested import BudgetTypeError, NestedRuntime, attach, checked_budget, load_nested

__all__ = ["BudgetTypeError", "NestedRuntime", "attach", "load", "load_nested"]


def _artifact_dir(path: Path) -> tuple[Path, dict[str, Any]]:
    """The artifact directory at ``path`` (a compile's output directory also works) and its manifest."""
    from flexc.export.nested import NotAnArtifactError, read_manifest

    for candidate in (path, path / "nested", path / "sliced"):
        manifest = read_manifest(candidate)  # a corrupt one is an error naming the file
        if manifest is not None:
            return candidate, manifest
    raise NotAnArtifactError(f"{path} is not a flexc artifact (no flexc_manifest.json); expected the 'nested' or "
                             "'sliced' export of a compile, one sliced budget's folder, or a compile's output "
                             "directory")


def _check_dtype_and_device(dtype: Any, device: Any) -> None:
    import torch

    if dtype is not None and not isinstance(dtype, torch.dtype) and not (
            isinstance(dtype, str) and (dtype == "auto" or isinstance(getattr(torch, dtype, None), torch.dtype))):
        raise ValueError(f"flexc.load(dtype): expected a torch dtype or its name ('float32', 'bfloat16', 'float16', "
                         f"'auto'); found {dtype!r}")
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"flexc.load(device): expected a torch device such as 'cpu' or 'cuda:0'; "
                             f"found {device!r}") from None


def load(path: str | Path, budget: float | None = None, *, dtype: Any = None, device: Any = None,
         backend: str = "auto", quantized: bool | None = None, adaptive: bool = False):
    """Load a compiled model as a transformers model.

    - a nested artifact (``<out>/nested``, or ``<out>``): at ``budget`` (default full width);
      ``model.set_budget(b)`` switches in place, ``model.flexc`` holds budgets and widths;
    - a sliced export (``<out>/sliced`` with ``budget=``, or one budget's folder
      ``<out>/sliced/keep_0.50``): that budget's checkpoint, channels physically removed.

    ``backend`` (``auto``/``reference``/``triton``) picks the nested runtime's expert kernels.
    ``quantized`` (a nested artifact compiled with ``quantize``): hold the experts as int8 codes and
    scales, each expert's kept prefix dequantized as it runs (default), or ``False``: as the
    dequantized float weights the artifact stores (faster here, more memory). The two compute the same.
    ``adaptive`` (a nested artifact compiled with ``adaptive_widths``, at a ``budget``): run its
    token-adaptive policy, each routed pair's width chosen by its routing weight (docs/adaptive.md);
    ``model.set_budget(b, adaptive=...)`` switches it too.
    """
    budget = checked_budget(budget, "flexc.load(budget)")  # "0.5": a clear error, not a TypeError later
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"flexc.load(path): expected the path of a compiled artifact; found {type(path).__name__}")
    _check_dtype_and_device(dtype, device)  # before the weights load, not after
    directory, manifest = _artifact_dir(Path(path).expanduser())
    kind = manifest.get("kind")
    if kind == "nested":
        return load_nested(directory, budget, dtype=dtype, device=device, backend=backend, quantized=quantized,
                           adaptive=adaptive)
    if adaptive:
        raise ValueError(f"flexc.load(adaptive=True) applies to nested artifacts; {directory} is a {kind} export "
                         "(its widths are fixed)")
    if quantized is not None:
        raise ValueError(f"flexc.load(quantized=...) applies to nested artifacts; {directory} is a {kind} export "
                         "(a quantized sliced checkpoint always holds its packed codes)")
    if kind == "sliced":
        from flexc.export.sliced import load_sliced, resolve_budget_dir
        from flexc.runtime.nested import check_weights, weights_errors

        folder = resolve_budget_dir(directory, budget)
        check_weights(folder)
        with weights_errors(folder):
            model = load_sliced(folder, **({"dtype": dtype} if dtype is not None else {}))
        return model.to(device).eval() if device is not None else model.eval()
    from flexc.export.nested import MANIFEST_FILE, ArtifactError

    raise ArtifactError(f"{directory / MANIFEST_FILE}: unknown flexc artifact kind {kind!r} "
                        "(expected 'nested' or 'sliced')")
