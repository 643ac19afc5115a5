"""The built-in passes, in the order a full pipeline uses them (docs/spec.md describes each); the registry reads this table."""

from flexc.passes.action_gates import InsertActionGates
from flexc.passes.adaptive_widths import AdaptiveWidths
from flexc.passes.anneal import Anneal
from flexc.passes.baselines import Coverage, Uniform
from flexc.passes.expert_prune import ExpertPrune, InsertRouterMasks
from flexc.passes.fold_masks import FoldMasks
from flexc.passes.lower_kernels import LowerKernels
from flexc.passes.quantize import Quantize
from flexc.passes.rank_channels import RankChannels
from flexc.passes.recover import Recover

BUILTIN_PASSES = (RankChannels, InsertActionGates, Anneal, Uniform, Coverage, ExpertPrune, InsertRouterMasks,
                  FoldMasks, Recover, Quantize, AdaptiveWidths, LowerKernels)
