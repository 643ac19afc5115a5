"""``python -m flexc`` is the ``flexc`` command."""

from flexc.cli import main

raise SystemExit(main())
