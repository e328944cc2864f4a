"""Optional dependencies: the one place a missing extra becomes the pip command that fixes it.

Each backend or adapter imports its third-party modules inside ``with requires_extra("name"):``.
An :class:`ImportError` there (the extra is not installed, or an installed version lacks a
name we use) or an :class:`OSError` (a C library the module loads is missing, e.g. the TSS 2.0
libraries under tpm2-pytss) becomes :class:`MissingDependencyError` naming the extra, chained
to the original error. The ``import`` statements themselves stay plain, so type checkers still
see the real modules.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from .errors import MissingDependencyError

__all__ = ["require", "requires_extra"]


@contextmanager
def requires_extra(extra: str, module: str | None = None) -> Iterator[None]:
    """Turn an import failure inside the block into MissingDependencyError for ``extra``.

    ``module`` names the third-party module when the failure does not (an OSError from a
    shared library); by default the extra's name stands in.
    """
    fallback = module or extra
    try:
        yield
    except MissingDependencyError:
        raise
    except ModuleNotFoundError as e:
        raise MissingDependencyError(e.name or fallback, extra) from e
    except ImportError as e:  # installed, but without a name we import (too old, or broken)
        raise MissingDependencyError(e.name or fallback, extra, detail=str(e)) from e
    except OSError as e:  # the module is there but a shared library it loads is not
        raise MissingDependencyError(fallback, extra, detail=str(e)) from e


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` by name, raising MissingDependencyError for ``extra`` when it fails."""
    with requires_extra(extra, module):
        return importlib.import_module(module)
