"""The pass interface: what a compiler pass declares and what it receives.

A pass is a class with a registry name, a pydantic options model (so a spec validates its
options before anything runs), the graph properties it requires and guarantees, and a
``preserves_computation`` flag that tests check by running the graph before and after.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from flexc.ir.graph import FlexGraph


class PassOptions(BaseModel):
    """Base for a pass's options. Unknown keys are spec errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class PassContext:
    """What a pass may use besides the graph.

    ``spec`` is the whole validated spec (None when a pass runs outside a compile),
    ``workdir`` the stage's own folder in the output directory (artifacts go there),
    ``state`` a dict that passes use to hand results to later passes (e.g. routing
    statistics, width tables); the driver persists it between stages.
    ``tokenizer`` is the model's tokenizer; ``calibration_data`` (optional) overrides the
    spec's calibration source with any iterable of ``[batch, seq]`` token tensors.
    """

    workdir: Path
    spec: Any = None
    seed: int = 0
    device: str = "cpu"
    state: dict[str, Any] = field(default_factory=dict)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("flexc"))
    quiet: bool = False
    tokenizer: Any = None
    calibration_data: Any = None

    def calibration_batches(self):
        """The calibration batches: the override if given, else the spec's calibration source."""
        if self.calibration_data is not None:
            return self.calibration_data
        source = getattr(getattr(self.spec, "data", None), "calibration", None)
        if source is None:
            raise ValueError("this pass needs calibration data: set data.calibration in the spec")
        if self.tokenizer is None:
            raise ValueError("this pass needs the model's tokenizer to read calibration data")
        from flexc.data.calibration import CalibrationSet

        return CalibrationSet(source, self.tokenizer, seed=self.seed)


@dataclass
class PassResult:
    """A pass's output: the (possibly new) graph and whether it changed anything."""

    graph: "FlexGraph"
    modified: bool = True
    changed_nodes: set[str] = field(default_factory=set)
    seconds: float = 0.0


class Pass:
    """Base class of every flexc pass, built-in or user-written.

    Subclasses set ``name`` and override :meth:`run`. ``requires`` and ``guarantees`` are
    property names (free-form strings such as ``"channels_ranked"``); the pipeline runner
    refuses a pipeline in which a pass runs before its requirements hold.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = PassOptions
    requires: ClassVar[frozenset[str]] = frozenset()
    guarantees: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    preserves_computation: ClassVar[bool] = False

    def __init__(self, options: PassOptions | dict | None = None):
        if options is None:
            options = {}
        if isinstance(options, dict):
            options = self.Options.model_validate(options)
        self.options = options

    def run(self, graph: "FlexGraph", ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError(f"pass {self.name!r} does not implement run()")

    def replay(self, graph: "FlexGraph", workdir: Path) -> None:
        """Re-apply this pass's structural rewrite to a freshly lowered graph (resume).

        Only passes that append to ``graph.rewrites`` are replayed; the default re-runs the
        pass with an empty state, which suits rewrites that depend only on their options.
        """
        self.run(graph, PassContext(workdir=workdir, quiet=True))

    def __call__(self, graph: "FlexGraph", ctx: PassContext) -> PassResult:
        result = self.run(graph, ctx)
        if not isinstance(result, PassResult):
            result = PassResult(graph=result)
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"
