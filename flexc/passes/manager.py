"""Running passes: the ordering check of a pipeline, and the one runner every caller uses.

Each pass needs properties that an earlier pass (or lowering, which provides ``"lowered"``)
guarantees. An unsatisfiable pipeline is refused before anything runs, naming the missing
property and the passes that could provide it. :class:`PassRunner` runs a pipeline for the
compile driver and ``flexc compare`` alike (:func:`run_pass`, one pass, is what it calls).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from flexc.errors import FlexcError
from flexc.ir.state import CompileState
from flexc.passes.base import Pass, PassContext, PassResult
from flexc.passes.registry import _BUILTINS, _load_builtins

INITIAL_PROPERTIES = frozenset({"lowered"})


class PipelineOrderError(ValueError):
    """A pass runs before the properties it requires hold."""

    def __init__(self, message: str, index: int, pass_name: str, missing: set[str]):
        super().__init__(message)
        self.index = index
        self.pass_name = pass_name
        self.missing = missing


def providers_of(prop: str) -> list[str]:
    """Names of built-in passes that guarantee ``prop``."""
    _load_builtins()
    return sorted(name for name, cls in _BUILTINS.items() if prop in cls.guarantees)


def check_pipeline(passes: Sequence[Pass | type[Pass]],
                   initial_properties: Iterable[str] = INITIAL_PROPERTIES) -> set[str]:
    """Raise :class:`PipelineOrderError` if any pass's requirements do not hold when it runs.

    Returns the properties that hold after the whole pipeline.
    """
    holds = set(initial_properties)
    for i, p in enumerate(passes):
        missing = set(p.requires) - holds
        if missing:
            hints = []
            for prop in sorted(missing):
                providers = providers_of(prop)
                later = [q.name for q in passes[i + 1:] if prop in q.guarantees]
                if later:
                    hints.append(f"{prop!r} is provided by {later[0]!r}, which runs later: move it before {p.name!r}")
                elif providers:
                    hints.append(f"{prop!r} is provided by {' or '.join(repr(x) for x in providers)}: add it before {p.name!r}")
                else:
                    hints.append(f"no known pass provides {prop!r}")
            raise PipelineOrderError(
                f"pipeline step {i + 1} ({p.name!r}) requires {', '.join(sorted(missing))}; " + "; ".join(hints),
                index=i, pass_name=p.name, missing=missing,
            )
        holds -= set(p.invalidates)
        holds |= set(p.guarantees)
    return holds


def run_pass(pass_: Pass, graph, ctx: PassContext, *, after: Sequence[str] = ()) -> PassResult:
    """Run one pass, time it, and record the properties it guarantees on the graph.

    A failure keeps its type and gains a note in torch.fx's style naming the pass and the
    passes that ran before it (``after``): "in pass 'anneal', after 'rank_channels',
    'insert_action_gates'".
    """
    start = time.perf_counter()
    try:
        result = pass_(graph, ctx)
    except Exception as exc:
        exc.add_note(failure_note(pass_.name, after, graph.properties))
        raise
    result.seconds = time.perf_counter() - start
    result.graph.properties -= set(pass_.invalidates)
    result.graph.properties |= set(pass_.guarantees)
    ctx.logger.info("pass %s finished in %.2fs", pass_.name, result.seconds)
    return result


def failure_note(name: str, after: Sequence[str], properties: Iterable[str]) -> str:
    """Where a pipeline stopped: the pass, the passes before it, the graph properties then."""
    before = f"after {', '.join(repr(a) for a in after)}" if after else "the first pass"
    return f"in pass {name!r}, {before} (graph properties then: {', '.join(sorted(properties)) or 'none'})"


class PassRunner:
    """Runs passes in order over one graph and one compile state: what ``flexc compile`` and
    ``flexc compare`` both use.

    ``context`` is a template :class:`PassContext` (spec, seed, device, logger, tokenizer,
    calibration data); each pass gets a copy with its own folder, ``workdirs / <stage>``, and
    the runner's state. ``done`` names passes that already ran on ``graph`` (a resumed
    compile's, or compare's shared ranking), so a failure says what ran before it.
    """

    def __init__(self, graph, context: PassContext, workdirs: Path, *, state: CompileState | None = None,
                 done: Sequence[str] = ()):
        self.graph = graph
        self.context = context
        self.workdirs = Path(workdirs)
        self.state = state if state is not None else CompileState()
        self.done = list(done)

    def check(self, passes: Sequence[Pass]) -> None:
        """Refuse (:class:`PipelineOrderError`) passes whose requirements will not hold when they run."""
        check_pipeline(passes, frozenset(self.graph.properties))

    def run(self, stage: str, pass_: Pass) -> PassResult:
        """Run ``pass_`` in the folder of ``stage`` (e.g. ``03-anneal``); structural rewrites it records
        are tagged with ``stage``, so a resumed compile replays them with this stage's pass."""
        workdir = self.workdirs / stage.replace(":", ".")
        workdir.mkdir(parents=True, exist_ok=True)  # an interrupted pass's folder is kept: anneal resumes there
        ctx = dataclasses.replace(self.context, workdir=workdir, state=self.state)
        rewrites_before = len(self.graph.rewrites)
        result = run_pass(pass_, self.graph, ctx, after=self.done)
        self.graph, self.state = result.graph, ctx.state
        for rewrite in self.graph.rewrites[rewrites_before:]:
            rewrite["stage"] = stage
        self.done.append(pass_.name)
        return result

    def run_all(self, steps: Iterable[tuple[str, Pass]]):
        """Check the order of ``(stage, pass)`` steps, run them, and return the graph."""
        steps = list(steps)
        self.check([p for _, p in steps])
        for stage, p in steps:
            self.run(stage, p)
        return self.graph


def run_checked(pass_: Pass, graph, ctx: PassContext, inputs: dict, atol: float = 1e-5) -> tuple[PassResult, float]:
    """Run a pass and measure how much it changed the graph's logits on ``inputs``.

    Returns the result and the max abs logit difference; raises if the pass claims
    ``preserves_computation`` and the difference exceeds ``atol``.
    """
    with torch.no_grad():
        before = graph.module(**inputs, use_cache=False).logits.clone()
    result = run_pass(pass_, graph, ctx)
    with torch.no_grad():
        after = result.graph.module(**inputs, use_cache=False).logits
    diff = float((before - after).abs().max())
    if pass_.preserves_computation and diff > atol:
        raise AssertionError(f"pass {pass_.name!r} claims preserves_computation but changed logits by {diff:.3g}")
    return result, diff


def replayer(completed: dict[str, Pass]) -> Callable[[dict, object, Path], None]:
    """Replays a saved structural rewrite with the pass built for its stage (``completed``:
    stage name -> the pass the spec's pipeline built there), for ``FlexGraph.load_state``.

    Nothing named in the saved state is imported: a rewrite whose stage is not one of
    ``completed``, or whose pass differs from that stage's, is refused.
    """

    def replay(rewrite: dict, graph, workdir: Path) -> None:
        stage = rewrite.get("stage")
        p = completed.get(stage) if isinstance(stage, str) else None
        if p is None or p.name != rewrite.get("pass"):
            raise FlexcError(
                f"state/graph: the saved graph lists a rewrite by pass {rewrite.get('pass')!r} at stage {stage!r}, "
                "which this spec's completed pipeline does not run there; the state was not written by this "
                "spec — start over with --force"
            )
        before = len(graph.rewrites)
        p.replay(graph, workdir / stage)
        for replayed in graph.rewrites[before:]:  # as run() tagged them: a later resume replays them again
            replayed["stage"] = stage

    return replay

