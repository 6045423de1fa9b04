"""``python -m xsp_middleware.cli``: the same as the ``xsp-middleware`` command."""

from .main import main

raise SystemExit(main())
