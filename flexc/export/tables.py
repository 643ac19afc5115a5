"""Width tables per budget: moved to :mod:`flexc.ir.tables` (re-exported here for old imports)."""

from flexc.ir.tables import WIDTHS_FILE, BudgetError, WidthTables, budget_key  # noqa: F401
