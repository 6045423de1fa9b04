"""The demo's pieces that examples and benchmarks use (``vast_xml``, ``vast_app``,
``demo_middleware``): kept at this path, which they import. The demo itself is
:mod:`xsp_middleware.cli.demo`."""

from .cli.demo import demo_middleware, vast_app, vast_xml

__all__ = ["demo_middleware", "vast_app", "vast_xml"]
