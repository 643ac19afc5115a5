"""What an exporter receives (:class:`ExportContext`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flexc.ir.state import CompileState


@dataclass
class ExportContext:
    """What an exporter receives."""

    target: Path
    spec: Any
    graph: Any = None
    model: Any = None
    tokenizer: Any = None
    state: CompileState = None  # type: ignore[assignment] -- an empty state when not given
    run_dir: Path | None = None
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("flexc"))

    def __post_init__(self) -> None:
        from flexc.ir.state import CompileState  # here: validating a spec imports this module, not torch

        if self.state is None:
            self.state = CompileState()
        elif isinstance(self.state, dict):  # the dict form of older callers
            groups = self.expert_groups() if "width_tables" in self.state else None
            self.state = CompileState.from_mapping(self.state, groups)

    def expert_groups(self):
        """The MoE layers: the graph's records, or found on the model when there is no graph."""
        if self.graph is not None:
            return self.graph.groups
        from flexc.ir.groups import find_expert_groups

        return find_expert_groups(self.model)

    def width_tables(self, fmt: str):
        """The run's width tables, or an error saying what the ``fmt`` export needs."""
        if self.state.width_tables is None:
            raise ValueError(
                f"the {fmt} export needs width tables, and this run has none: add a pass that chooses widths "
                "(anneal after rank_channels and insert_action_gates, or a baseline) to the spec's pipeline")
        return self.state.checked_width_tables()

    def provenance(self) -> dict[str, Any]:
        return provenance(self.spec)


def provenance(spec: Any) -> dict[str, Any]:
    """What an artifact's manifest records about how it was made: the spec, seed, library versions."""
    from flexc.utils.versions import library_versions

    return {"spec": spec.to_yaml() if spec is not None else None, "seed": getattr(spec, "seed", None),
            "versions": library_versions()}
