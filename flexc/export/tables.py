"""Width tables of a compile: one ``[layers, experts]`` table of widths per budget.

Passes that choose widths (``anneal``, the baselines) hand them to later stages through the
pass state as ``width_budgets [B]`` (keep ratios, descending), ``width_tables [B, L, E]``
(int32) and ``width_metric``. :class:`WidthTables` is that record as an object, with the
nesting invariant checked, and its file form ``widths.safetensors`` inside every artifact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

WIDTHS_FILE = "flexc_widths.safetensors"


class BudgetError(KeyError):
    """A budget was asked for that the artifact does not have."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0])


def budget_key(budget: float) -> str:
    """Directory/file-name form of a budget: ``keep_0.50``."""
    return f"keep_{budget:.2f}"


@dataclass
class WidthTables:
    """``tables[b]`` is the width table of keep ratio ``budgets[b]`` (budgets descending)."""

    budgets: list[float]
    tables: torch.Tensor  # [B, L, E] int32
    metric: str
    layers: list[int]  # decoder-layer index of each table row
    full: list[int]  # full intermediate size of each row's experts

    def __post_init__(self) -> None:
        self.tables = torch.as_tensor(self.tables).to(torch.int32)
        if self.tables.dim() != 3 or self.tables.shape[0] != len(self.budgets):
            raise ValueError(f"width tables must be [budgets={len(self.budgets)}, layers, experts]; "
                             f"found {tuple(self.tables.shape)}")
        if self.tables.shape[1] != len(self.layers) or len(self.full) != len(self.layers):
            raise ValueError("width tables: one layer index and one full width per table row expected")
        if any(a <= b for a, b in zip(self.budgets, self.budgets[1:])):
            raise ValueError(f"budgets must be strictly descending; found {self.budgets}")
        full = torch.tensor(self.full, dtype=torch.int32)[None, :, None]
        if int(self.tables.min()) < 0 or bool((self.tables > full).any()):
            raise ValueError("width tables: every width must lie in [0, full width]")
        grown = self.tables[1:] > self.tables[:-1]
        if bool(grown.any()):
            b, l, e = (int(i) for i in grown.nonzero()[0])
            raise ValueError(f"width tables are not nested: layer {self.layers[l]} expert {e} grows from "
                             f"{int(self.tables[b, l, e])} to {int(self.tables[b + 1, l, e])} channels when the "
                             f"budget falls from {self.budgets[b]} to {self.budgets[b + 1]}")

    # ---- lookup ----------------------------------------------------------------------
    def index(self, budget: float) -> int:
        for i, b in enumerate(self.budgets):
            if abs(b - budget) < 1e-6:
                return i
        raise BudgetError(f"no width table for budget {budget}; available budgets: "
                          f"{', '.join(f'{b:g}' for b in self.budgets)} (or 1.0 for full width)")

    def table(self, budget: float) -> torch.Tensor:
        """Widths ``[L, E]`` of ``budget``; 1.0 means full width even if not exported."""
        if abs(budget - 1.0) < 1e-6 and not any(abs(b - 1.0) < 1e-6 for b in self.budgets):
            return self.full_table()
        return self.tables[self.index(budget)].clone()

    def full_table(self) -> torch.Tensor:
        return torch.tensor(self.full, dtype=torch.int32)[:, None].expand(self.tables.shape[1:]).clone()

    # ---- persistence -------------------------------------------------------------------
    @classmethod
    def from_state(cls, state: dict[str, Any], groups, *, allow_expert_masks: bool = False) -> "WidthTables":
        """The tables a width-choosing pass handed on.

        Whole-expert pruning (``expert_masks``) also masks router logits, which width tables
        alone cannot express: only callers that apply those masks themselves accept it.
        """
        if "width_tables" not in state:
            raise ValueError("no width tables: the pipeline must run a pass that chooses widths "
                             "(anneal, or a baseline such as uniform) before this stage")
        masks = state.get("expert_masks")
        if masks is not None and bool(torch.as_tensor(masks).any()) and not allow_expert_masks:
            raise ValueError("these tables remove whole experts (expert_prune), which also re-routes tokens "
                             "through router masks; nested, sliced and ONNX exports support width tables "
                             "only (anneal, uniform, coverage) for now")
        return cls(
            # Budgets travel as float tensors: round away float32 noise (0.30000001 -> 0.3).
            budgets=[round(float(b), 6) for b in state["width_budgets"]],
            tables=state["width_tables"],
            metric=str(state.get("width_metric", "params")),
            layers=[g.layer for g in groups],
            full=[g.intermediate_size for g in groups],
        )

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        from flexc.utils.atomic import atomic_path

        meta = {"metric": self.metric, "layers": json.dumps(self.layers), "full": json.dumps(self.full),
                "budgets": json.dumps(self.budgets)}
        with atomic_path(Path(path)) as tmp:
            save_file({"widths": self.tables.contiguous()}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "WidthTables":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tables = f.get_tensor("widths")
        return cls(budgets=json.loads(meta["budgets"]), tables=tables, metric=meta["metric"],
                   layers=json.loads(meta["layers"]), full=json.loads(meta["full"]))
