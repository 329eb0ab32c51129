"""Circuit discovery methods, one module each, registered in :mod:`kcircuits.discover.registry`.

Importing this package is cheap (the registry imports no torch); ``registry.load_all()`` imports
the method modules when a method is needed.
"""

from kcircuits.api_module import make_callable
from kcircuits.discover.registry import METHODS, DiscoveryMethod, get_method, load_all, register

make_callable(__name__, "discover")  # kcircuits.discover(...) is kcircuits.api.discover

__all__ = ["METHODS", "DiscoveryMethod", "get_method", "load_all", "register"]
