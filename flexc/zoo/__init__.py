"""The offline reference model zoo: small MoE models that flexc trains itself.

Pruning a random model proves nothing and no model hub may be reachable, so flexc trains its
own reference models on its builtin corpora (:mod:`flexc.data.builtin`): real transformers
architectures (Qwen3-MoE, Mixtral, Qwen2-MoE, OLMoE) with a byte-level BPE tokenizer,
saved so that ``AutoTokenizer.from_pretrained(path)`` and
``AutoModelForCausalLM.from_pretrained(path)`` load it offline.

Models (see :data:`RECIPES`):

* ``tiny``: 2 layers, 8 experts top-2; under 3 minutes on one CPU core (quickstart, tests).
* ``mixtral-tiny``: a Mixtral-style second family (benchmarks).
* ``small``: 4 layers, 16 experts top-4; ~25 minutes on 2 CPU cores (benchmarks).
* ``qwen2-moe-prose`` (Qwen2-MoE with a shared expert, 16 experts top-4) and ``olmoe-prose``
  (64 small experts top-8): trained on English prose (``python-docs``), the models the anneal's
  defaults were not tuned on.

Checkpoints are cached under ``<cache>/zoo/<name>/`` where ``<cache>`` is ``$FLEXC_CACHE``,
else ``$XDG_CACHE_HOME/flexc``, else ``~/.cache/flexc``. Each holds a ``manifest.json`` with the
recipe, seed, corpus identity, library versions, training time, train loss, held-out
perplexity and the unigram perplexity of the same held-out tokens. A build with a non-default
``seed`` or ``steps`` is cached under its own key (``<name>-seed<S>``, ``<name>-steps<N>``)
and never replaces the default model.

Example::

    import flexc.zoo
    path = flexc.zoo.resolve("tiny")          # builds on first use, then cached
    for entry in flexc.zoo.available():
        print(entry.name, entry.cached, entry.path)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from flexc.zoo.cache import build_lock, cache_root, install, is_complete, remove_stale_temps, temp_dir, zoo_root
from flexc.zoo.recipes import GRANULE, RECIPES, Recipe

__all__ = [
    "GRANULE",
    "RECIPES",
    "Recipe",
    "UnknownZooModel",
    "ZooEntry",
    "available",
    "build",
    "cache_root",
    "entry_path",
    "get_recipe",
    "load_manifest",
    "resolve",
    "zoo_root",
]


class UnknownZooModel(ValueError):
    """A zoo model name that no recipe defines."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"unknown zoo model {name!r}; available: {', '.join(RECIPES)}")


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """One zoo model as :func:`available` sees it.

    Attributes:
        name: recipe name (``"tiny"``, ``"small"``).
        description: one line on size, cost and use.
        cached: a complete checkpoint built from the current recipe is in the cache.
        path: where the (default-seed, default-steps) checkpoint is or will be.
        manifest: the cached checkpoint's manifest, or None when nothing is cached.
        stale: a checkpoint is cached but was built from a different recipe or manifest
            format; :func:`build` rebuilds it.
    """

    name: str
    description: str
    cached: bool
    path: Path
    manifest: dict[str, Any] | None
    stale: bool = False


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; raises :class:`UnknownZooModel`."""
    try:
        return RECIPES[name]
    except (KeyError, TypeError):
        raise UnknownZooModel(name) from None


def entry_path(name: str, *, seed: int | None = None, steps: int | None = None) -> Path:
    """Cache directory of a build of ``name`` with the given overrides (None: recipe default)."""
    recipe = get_recipe(name)
    key = recipe.name
    if seed is not None and int(seed) != recipe.seed:
        key += f"-seed{int(seed)}"
    if steps is not None and int(steps) != recipe.steps:
        key += f"-steps{int(steps)}"
    return zoo_root() / key


def load_manifest(path: str | Path) -> dict[str, Any] | None:
    """The ``manifest.json`` of a checkpoint directory, or None if absent or unreadable."""
    try:
        return json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


#: The manifest layout flexc.zoo.train writes (a test checks the two agree). Kept here too:
#: importing the trainer loads torch, which `flexc zoo list` should not wait for.
MANIFEST_FORMAT = 1


def _is_current(manifest: dict[str, Any] | None, recipe: Recipe) -> bool:
    return (
        manifest is not None
        and manifest.get("format") == MANIFEST_FORMAT
        and _weights_fields(manifest.get("recipe") or {}) == _weights_fields(recipe.to_dict())
    )


def _weights_fields(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe fields that determine the weights (the description does not)."""
    return {k: v for k, v in recipe.items() if k != "description"}


def _cached(path: Path, recipe: Recipe) -> bool:
    return is_complete(path) and _is_current(load_manifest(path), recipe)


def available() -> list[ZooEntry]:
    """Every zoo model, with whether (and where) its default build is cached."""
    entries = []
    for name, recipe in RECIPES.items():
        path = entry_path(name)
        manifest = load_manifest(path) if is_complete(path) else None
        current = _is_current(manifest, recipe)
        entries.append(
            ZooEntry(
                name=name,
                description=recipe.description,
                cached=current,
                path=path,
                manifest=manifest,
                stale=manifest is not None and not current,
            )
        )
    return entries


def build(
    name: str,
    *,
    force: bool = False,
    seed: int | None = None,
    steps: int | None = None,
    progress: bool = True,
) -> Path:
    """Train zoo model ``name`` unless it is cached; return its checkpoint directory.

    Args:
        name: a key of :data:`RECIPES`.
        force: retrain even if cached (the old checkpoint is replaced atomically at the end).
        seed: training seed (default: the recipe's); a non-default seed is cached separately.
        steps: number of optimizer steps (default: the recipe's); a non-default count is cached
            separately, so short runs never replace the real model.
        progress: show progress (rich, on stderr) while training.

    Concurrent builds of the same model are serialised with a lock file; the second waits
    and then returns the first one's checkpoint. An interrupted build leaves nothing that
    looks complete.
    """
    recipe = get_recipe(name)
    if steps is not None and int(steps) < 1:
        raise ValueError("steps must be >= 1")
    final = entry_path(name, seed=seed, steps=steps)
    if not force and _cached(final, recipe):
        return final
    def waiting() -> None:
        if progress:
            from rich.console import Console

            Console(stderr=True).print(f"[bold]zoo/{name}[/bold] waiting for another process building {final}")

    with build_lock(final, on_wait=waiting):
        if not force and _cached(final, recipe):
            return final  # built by another process while we waited
        remove_stale_temps(final)
        from flexc.zoo.train import train_checkpoint

        with temp_dir(final) as tmp:
            train_checkpoint(recipe, tmp, seed=seed, steps=steps, progress=progress)
            return install(tmp, final, replace=True)


def resolve(name: str, *, progress: bool = True) -> Path:
    """The checkpoint directory of zoo model ``name``, building it first if needed."""
    return build(name, progress=progress)
