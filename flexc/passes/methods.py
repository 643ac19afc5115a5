"""The width-choosing methods ``flexc compare`` puts side by side, each a pipeline of passes run
after one shared ranking (``rank_channels`` with the spec's options). Named as on the command line:

- ``flexmoe``: the spec's ``insert_action_gates`` and ``anneal`` (learned nested widths);
- ``uniform``, ``coverage``: the baseline passes of :mod:`flexc.passes.baselines`;
- ``expert_prune[:CRITERION]``: whole experts removed (criterion: frequency, router_weight,
  man, msan, reap).

Each takes its options from the spec's pipeline entry of the same pass, if any.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flexc.passes.registry import resolve_pass

RANKING = "rank_channels"  # run once; every method starts from its ranked model
BASELINES = ("uniform", "coverage", "expert_prune")
LEARNED = "flexmoe"
METHODS = (LEARNED, *BASELINES)
#: The pipeline prefix whose stage folders a compile leaves for ``flexmoe`` to reuse (ranking, gates, tables).
LEARNED_PREFIX = (RANKING, "insert_action_gates", "anneal")


@dataclass
class Method:
    label: str  # as given, e.g. "expert_prune:man"
    passes: list[tuple[str, dict]] = field(default_factory=list)

    @property
    def learned(self) -> bool:
        return self.label == LEARNED


def parse_methods(text: str, spec=None) -> list[Method]:
    """``"flexmoe,uniform,expert_prune:man"`` -> the passes each method runs after ranking; the
    learned method last (its action gates stay in the graph, at full width)."""
    entries = {e.name: dict(e.options) for e in getattr(spec, "pipeline", None) or []}
    out = []
    for label in [m.strip() for m in text.split(",") if m.strip()]:
        name, _, arg = label.partition(":")
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)} "
                             "(expert_prune takes a criterion: expert_prune:man)")
        if arg and name != "expert_prune":
            raise ValueError(f"method {name!r} takes no ':' argument (found {label!r})")
        if name == LEARNED:
            passes = [(p, entries.get(p, {})) for p in LEARNED_PREFIX[1:]]
        elif name == "expert_prune":
            passes = [(name, {**entries.get(name, {}), **({"criterion": arg} if arg else {})})]
        else:
            passes = [(name, entries.get(name, {}))]
        for pass_name, options in passes:
            resolve_pass(pass_name)(options)  # validate options before anything runs
        out.append(Method(label, passes))
    if not out:
        raise ValueError("no methods given")
    if [m.label.split(":")[0] for m in out].count(LEARNED) > 1:
        raise ValueError(f"{LEARNED} may be given once")
    return sorted(out, key=lambda m: m.label.startswith(LEARNED))


def ranking_options(spec) -> dict:
    """The spec's ranking options (no plot when it has none)."""
    return next((dict(e.options) for e in spec.pipeline if e.name == RANKING), {"plot": False})


def steps(method: Method, groups, budgets: list[float]) -> tuple[list[tuple[str, object]], list[float] | None]:
    """``method``'s passes, built, for ``PassRunner.run_all``, and the budgets it cannot reach (None when
    all are): whole-expert pruning keeps top_k experts per layer, so lower budgets are left out of its
    pass's options."""
    out, unreachable = [], None
    for pass_name, options in method.passes:
        if resolve_pass(pass_name).prunes_whole_experts:
            floor = max(g.top_k / g.num_experts for g in groups)
            unreachable = [b for b in budgets if b < floor - 1e-9]
            options = {**options, "budgets": [b for b in budgets if b >= floor - 1e-9]}
        out.append((method.label, resolve_pass(pass_name)(options)))
    return out, unreachable
