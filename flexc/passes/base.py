"""The pass interface: what a compiler pass declares and what it receives.

A pass is a class with a registry name, a pydantic options model (so a spec validates its
options before anything runs), the graph properties it requires and guarantees, and a
``preserves_computation`` flag that tests check by running the graph before and after.

It also says what the compiler must know of it without a table of pass names: the packages
it needs, what it checks in a spec before anything loads (:meth:`Pass.check_spec`), the lowest
keep it can reach (:meth:`Pass.keep_floor`), whether the width exports can express it
(``prunes_whole_experts``), whether it runs data-parallel (:meth:`Pass.data_parallel_problem`),
and whether and how it streams (``streams``, :meth:`Pass.run_streamed`,
:meth:`Pass.export_merger`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, field_validator

from flexc.utils.numbers import parses_as_number

if TYPE_CHECKING:
    from flexc.ir.graph import FlexGraph
    from flexc.ir.state import CompileState


def _numeric(annotation: Any) -> bool:
    """Whether a field annotation takes numbers (int/float, possibly optional) and not booleans."""
    if annotation in (int, float):
        return True
    if get_origin(annotation) is Literal:
        return False
    args = get_args(annotation)
    return bool not in args and any(_numeric(a) for a in args)


def _accepts_str(annotation: Any) -> bool:
    """Whether a field annotation takes free text (``str``, or a union with it; a ``Literal`` of
    words such as ``"auto"`` does not: ``"64"`` is then a quoted number)."""
    if annotation is str:
        return True
    if get_origin(annotation) is Literal:
        return False
    return any(_accepts_str(a) for a in get_args(annotation))


def _not_a_number(value: Any, strings: bool) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if strings and isinstance(value, str) and parses_as_number(value):  # other strings: pydantic's own message
        return f"the string {value!r} (remove the quotes)"
    return None


def reject_bool_numbers(cls: type[BaseModel], value: Any, info: Any) -> Any:
    """A ``field_validator("*", mode="before")`` body: refuse ``true``/``false`` where a number is
    expected, and a string where only a number is.

    pydantic reads a bool as 1/0 for int and float fields, so ``num_samples: true`` would run
    with one sample, and a quoted ``"0.3"`` as 0.3, so one budget list could mix numbers and
    strings; a spec author never means either.
    """
    field = cls.model_fields.get(info.field_name)
    if field is None or not _numeric(field.annotation):
        return value
    strings = not _accepts_str(field.annotation)
    found = _not_a_number(value, strings)
    if found is not None:
        raise ValueError(f"expected a number; found {found}")
    if isinstance(value, list) and get_origin(field.annotation) is not None:
        for i, item in enumerate(value):
            found = _not_a_number(item, strings)
            if found is not None:
                raise ValueError(f"expected numbers; found {found} at position {i}")
    return value


MAX_STEPS = 1_000_000  # training steps a pass accepts: days of training; beyond it, a typo (steps: 10**9)


def check_granule(v: int | None) -> int | None:
    """A width granule: a power of two (the kernels' tiles, and every pass's widths the same grid)."""
    if v is not None and v & (v - 1):
        raise ValueError(f"granule must be a power of two (kernel tiles); found {v}, expected e.g. "
                         f"{1 << (v.bit_length() - 1)} or {1 << v.bit_length()}")
    return v


def check_keep_ratios(values: list[float] | None) -> list[float] | None:
    """A ``budgets`` option: keep ratios in (0, 1] (None: the spec's budgets)."""
    for i, v in enumerate(values or ()):
        if not 0 < v <= 1:
            raise ValueError(f"keep ratios must be in (0, 1]; found {v:g} at position {i}")
    return values


class PassOptions(BaseModel):
    """Base for a pass's options. Unknown keys are spec errors, never silently ignored.

    Floats must be finite (``lr: .inf`` would make every logit non-finite) and numbers are
    never booleans.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    _no_bools = field_validator("*", mode="before")(classmethod(reject_bool_numbers))

    def needs_calibration(self, earlier: frozenset[str]) -> bool:
        """Whether the pass reads calibration data, given the properties earlier passes guarantee."""
        return False


@dataclass
class PassContext:
    """What a pass may use besides the graph.

    ``spec`` is the whole validated spec (None when a pass runs outside a compile),
    ``workdir`` the stage's own folder in the output directory (artifacts go there),
    ``state`` the typed :class:`~flexc.ir.state.CompileState` that passes read and set to
    hand results to later passes (routing statistics, channel scores, width tables; a user
    pass's own results in ``state.extras``); the driver saves it after every stage.
    ``tokenizer`` is the model's tokenizer; ``calibration_data`` (optional) overrides the
    spec's calibration source with any iterable of ``[batch, seq]`` token tensors.
    """

    workdir: Path
    spec: Any = None
    seed: int = 0
    device: str = "cpu"
    state: CompileState = None  # type: ignore[assignment] -- an empty state when not given
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("flexc"))
    quiet: bool = False
    tokenizer: Any = None
    calibration_data: Any = None
    # The spec's calibration set, read once and shared by every pass of a compile (the runner's
    # per-pass copies of this context share the dict).
    _read_once: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        from flexc.ir.state import CompileState  # here: validating a spec imports this module, not torch

        if self.state is None:
            self.state = CompileState()
        elif isinstance(self.state, dict):  # the dict form of older callers
            self.state = CompileState.from_mapping(self.state)

    def calibration_batches(self):
        """The calibration batches: the override if given, else the spec's calibration source (read
        and tokenized once per compile, on the first call)."""
        if self.calibration_data is not None:
            return self.calibration_data
        source = getattr(getattr(self.spec, "data", None), "calibration", None)
        if source is None:
            raise ValueError("this pass needs calibration data: set data.calibration in the spec")
        if self.tokenizer is None:
            raise ValueError("this pass needs the model's tokenizer to read calibration data")
        from flexc.data.calibration import CalibrationSet, LoadedCalibration

        key = (id(source), id(self.tokenizer), self.seed, self.device)
        if key not in self._read_once:
            self._read_once[key] = LoadedCalibration(CalibrationSet(source, self.tokenizer, seed=self.seed,
                                                                    device=self.device))
        return self._read_once[key]


Problem = tuple[tuple, str]  # (where in the spec, e.g. ("pipeline", 2), message)


@dataclass(frozen=True)
class SpecSite:
    """Where a pass sits in a spec, for :meth:`Pass.check_spec`: the whole spec, the pass's index in
    its pipeline, the model's shape as its config says (``intermediate_size``, ``num_experts``,
    ``top_k``, ``vocab_size``, ``config_file``; None when the model is not known yet) and the device
    the spec resolves to (None when it does not)."""

    spec: Any
    index: int
    shape: Any = None
    device: str | None = None

    @property
    def loc(self) -> tuple:
        return ("pipeline", self.index)


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
    # A layer-streamed compile (execution.stream: layers, docs/scale.md) runs a pass that sets
    # ``streams``: through :meth:`run` as it is (it reads ``graph.groups`` and the hand-off state,
    # or trains through the layer model), or through :meth:`run_streamed` where the pass overrides it.
    streams: ClassVar[bool] = False
    not_streamed_because: ClassVar[str] = "it does not declare a streamed form (Pass.streams)"
    # Reads the layers' weights as the source has them: it cannot follow a pass whose streamed form
    # leaves its weight changes to the exports (``merges_at_export``, e.g. recover's adapters).
    reads_source_weights: ClassVar[bool] = False
    merges_at_export: ClassVar[bool] = False
    # Optional packages the pass imports when it starts (``pip install 'flexc[<name>]'``): a spec
    # that lists the pass is refused before the run when one is missing.
    packages: ClassVar[tuple[str, ...]] = ()
    # Removes whole experts by re-routing tokens: the width exports (nested, sliced, onnx, hf) cannot
    # express it.
    prunes_whole_experts: ClassVar[bool] = False

    @classmethod
    def check_spec(cls, options: PassOptions, site: SpecSite) -> list[Problem]:
        """What this pass with ``options`` cannot do in ``site.spec`` on ``site.shape``, found from configs
        and file headers before any weight loads; ``(spec location, message)`` pairs."""
        return []

    @classmethod
    def keep_floor(cls, options: PassOptions, shape: Any, metric: str) -> tuple[float, str] | None:
        """The lowest keep ratio this pass can reach on a model of ``shape`` under ``metric``, and why
        (None: no floor, or one that depends on data)."""
        return None

    @classmethod
    def data_parallel_problem(cls, options: PassOptions) -> str | None:
        """Why this pass cannot split its calibration over torchrun's processes (None when it can)."""
        return None

    @classmethod
    def export_merger(cls, model: Any, state: "CompileState") -> Any:
        """For a pass that ``merges_at_export``: ``f(layer, layer_graph)`` that applies its weight change
        to each decoder layer the streamed exports load (None when this compile made none)."""
        return None

    def __init__(self, options: PassOptions | dict | None = None):
        if options is None:
            options = {}
        if isinstance(options, dict):
            options = self.Options.model_validate(options)
        self.options = options

    def run(self, graph: "FlexGraph", ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError(f"pass {self.name!r} does not implement run()")

    def run_streamed(self, model: Any, ctx: PassContext) -> None:
        """This pass in a layer-streamed compile, on the layer model (:class:`flexc.ir.streaming.LayerModel`):
        override where :meth:`run` needs the whole graph; results go to ``ctx.state``."""
        raise NotImplementedError(f"pass {self.name!r} has no streamed form")

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
