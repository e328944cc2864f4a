"""Optional dependencies: a missing extra is a typed error that says which one to install."""

from __future__ import annotations

import importlib.util

from .errors import MissingDependencyError

__all__ = ["require_extra"]


def require_extra(module: str, extra: str) -> None:
    """Raise :class:`MissingDependencyError` naming ``extra`` unless ``module`` is importable."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingDependencyError(module, extra)
