"""The built-in export formats; the registry (:mod:`flexc.export.registry`) reads this table."""

from flexc.export.graph import export_graph
from flexc.export.hf import export_hf
from flexc.export.nested import export_nested
from flexc.export.onnx_export import export_onnx  # imports onnx lazily, inside the exporter
from flexc.export.sliced import export_sliced

BUILTIN_EXPORTERS = {"nested": export_nested, "sliced": export_sliced, "hf": export_hf, "onnx": export_onnx,
                     "graph": export_graph}
