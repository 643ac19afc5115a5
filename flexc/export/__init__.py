"""Export formats: one module per format (:mod:`flexc.export.builtin` lists them), found by name
through :mod:`flexc.export.registry`; shared pieces: :mod:`flexc.ir.tables` (width tables per
budget) and :mod:`flexc.export.slicing` (expert weights cut to their widths).
"""
