"""The IR: the canonical expert op, family adapters, lowering to a FlexGraph."""

from flexc.ir.families import (
    FamilyAdapter,
    NotMoEError,
    UnsupportedFamilyError,
    UnsupportedModelError,
    detect_family,
    supported_families,
)
from flexc.ir.graph import FlexGraph
from flexc.ir.groups import ExpertGroup, find_expert_groups
from flexc.ir.lower import lower
from flexc.ir.op import call_moe_experts, moe_experts_reference

__all__ = [
    "ExpertGroup",
    "FamilyAdapter",
    "FlexGraph",
    "NotMoEError",
    "UnsupportedFamilyError",
    "UnsupportedModelError",
    "call_moe_experts",
    "detect_family",
    "find_expert_groups",
    "lower",
    "moe_experts_reference",
    "supported_families",
]
