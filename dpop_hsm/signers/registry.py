"""Key references -> signers: a ``scheme -> loader`` table that users can extend.

Backends are imported only when their scheme is used, so ``import dpop_hsm`` never loads
python-pkcs11 or tpm2-pytss, and a missing extra is reported as the pip command that fixes it.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable

from ..errors import KeyReferenceError
from ..secret_sources import SecretSource
from .base import Signer

__all__ = ["Loader", "load_signer", "register_scheme"]

Loader = Callable[[str, SecretSource | None], Signer]

# scheme -> "module:function" (lazy) or a loader callable (registered by users).
_LOADERS: dict[str, str | Loader] = {
    "file": "dpop_hsm.signers.software:load_file_reference",
    "pkcs11": "dpop_hsm.signers.pkcs11:load_pkcs11_reference",
    "tpm2": "dpop_hsm.signers.tpm:load_tpm_reference",
}
_LOCK = threading.Lock()


def register_scheme(scheme: str, loader: Loader) -> None:
    """Let ``load_signer("<scheme>:…")`` build a user-defined Signer (e.g. a cloud KMS)."""
    if not scheme.isascii() or not scheme.replace("+", "").replace("-", "").isalnum():
        raise KeyReferenceError(f"invalid URI scheme {scheme!r}")
    with _LOCK:
        _LOADERS[scheme.lower()] = loader


def _scheme_of(ref: str) -> str:
    head, sep, _ = ref.partition(":")
    # "C:\\key.pem" and plain relative paths are files; a scheme is 2+ chars of URI syntax.
    if sep and len(head) > 1 and head.replace("+", "").replace("-", "").isalnum():
        return head.lower()
    return "file"


def _resolve(scheme: str) -> Loader:
    with _LOCK:
        entry = _LOADERS.get(scheme)
    if entry is None:
        known = ", ".join(sorted(_LOADERS))
        raise KeyReferenceError(
            f"unknown key reference scheme {scheme!r} (known: {known}, or a path)"
        )
    if callable(entry):
        return entry
    module_name, _, attr = entry.partition(":")
    module = importlib.import_module(module_name)
    loader: Loader = getattr(module, attr)
    return loader


def load_signer(ref: str, *, secret: SecretSource | None = None) -> Signer:
    """Load the key named by ``ref`` and return a ready Signer.

    ``ref`` is a path or ``file:`` URI (PEM, DER or JWK), an RFC 7512 ``pkcs11:`` URI, or a
    ``tpm2:`` reference. ``secret`` is the key password, PIN or TPM auth value — a string or a
    callable returning one; ``pkcs11:`` URIs also read ``pin-source`` and ``DPOP_HSM_PIN``,
    ``tpm2:`` references ``auth-source`` and ``DPOP_HSM_TPM_AUTH``.

    Raises KeyReferenceError for a malformed reference, MissingDependencyError when the backend's
    extra is not installed, and SignerError subclasses for key and device problems.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise KeyReferenceError("key reference must be a non-empty string")
    if any(ord(ch) < 0x20 for ch in ref):
        raise KeyReferenceError("key reference contains control characters")
    return _resolve(_scheme_of(ref))(ref, secret)
