"""Imports every built-in pass module so that each registers itself."""

# Each import below registers its pass(es) with flexc.passes.registry.
from flexc.passes import rank_channels  # noqa: F401
from flexc.passes import action_gates, anneal  # noqa: F401,E402
from flexc.passes import fold_masks, lower_kernels  # noqa: F401,E402
from flexc.passes import baselines, expert_prune  # noqa: F401,E402
from flexc.passes import recover  # noqa: F401,E402
