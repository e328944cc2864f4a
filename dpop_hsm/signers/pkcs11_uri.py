"""Old import path of :mod:`dpop_hsm.signers.pkcs11.uri` (RFC 7512 URIs); kept working."""

from __future__ import annotations

from .pkcs11.locate import MODULE_DIRS_ENV, module_search_dirs, resolve_module_name
from .pkcs11.uri import MODULE_ENV, PIN_ENV, Pkcs11Uri

__all__ = [
    "MODULE_DIRS_ENV",
    "MODULE_ENV",
    "PIN_ENV",
    "Pkcs11Uri",
    "module_search_dirs",
    "resolve_module_name",
]
