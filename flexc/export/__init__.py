"""Export formats. Importing this package registers every built-in exporter.

Each module registers one format with :func:`flexc.export.registry.register_exporter`;
shared pieces: :mod:`flexc.ir.tables` (width tables per budget) and
:mod:`flexc.export.slicing` (expert weights cut to their widths).
"""

from flexc.export import graph, hf, nested  # noqa: F401
from flexc.export import sliced  # noqa: F401
from flexc.export import onnx_export  # noqa: F401  (imports onnx lazily, inside the exporter)
