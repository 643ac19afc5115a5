"""The export-format registry: it lives in :mod:`flexc.export.registry` (re-exported here).

The driver and spec validation use it through this name; exporters import
:mod:`flexc.export.registry` directly, so the export package never imports the compiler.
"""

from flexc.export.registry import (  # noqa: F401
    ENTRY_POINT_GROUP,
    KNOWN_FORMATS,
    _EXPORTERS,
    ExportContext,
    Exporter,
    available_exports,
    get_exporter,
    not_available_message,
    register_exporter,
)
