"""Keep ratios and the fit-to-budget rule: moved to :mod:`flexc.ir.tables` (re-exported here)."""

from flexc.ir.tables import expert_weights, fit_to_budget, keep_ratio, per_layer_keep  # noqa: F401
