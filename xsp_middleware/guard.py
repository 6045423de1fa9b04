"""Kept for imports of ``xsp_middleware.guard``: the decision core is :mod:`xsp_middleware.core`
(``core.guard``, ``core.request``, ``core.rules``, ``core.admission``)."""

from .core.guard import Guard
from .core.request import Facts, cookie_value, query_values
from .core.rules import RouteRules, rules_of

__all__ = ["Facts", "Guard", "RouteRules", "cookie_value", "query_values", "rules_of"]
