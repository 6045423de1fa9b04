"""The ``xsp-middleware`` command line: campaigns, users, ``doctor`` and ``demo``
(``main.py`` parses and dispatches; ``doctor.py`` and ``demo.py`` are those two commands)."""

from .main import main

__all__ = ["main"]
