"""Key references -> signers: a ``scheme -> (loader, generator)`` table that users can extend.

Backends are imported only when their scheme is used, so ``import dpop_hsm`` never loads
python-pkcs11 or tpm2-pytss, and a missing extra is reported as the pip command that fixes it.
The same table answers "open this key" (:func:`load_signer`) and "create this key"
(:func:`generate_signer`), so a caller such as the CLI never matches reference prefixes itself.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import KeyReferenceError
from ..secret_sources import SecretSource
from .base import Signer

__all__ = ["Generator", "Loader", "generate_signer", "load_signer", "register_scheme"]

Loader = Callable[[str, SecretSource | None], Signer]
# (reference, alg or None for the backend's default, secret) -> a signer for the new key.
Generator = Callable[[str, str | None, SecretSource | None], Signer]


@dataclass(frozen=True)
class _Scheme:
    # "module:function" (lazy, our backends) or a callable (registered by users).
    loader: str | Loader
    generator: str | Generator | None


_SCHEMES: dict[str, _Scheme] = {
    "file": _Scheme(
        "dpop_hsm.signers.software:load_file_reference",
        "dpop_hsm.signers.software:generate_file_reference",
    ),
    "pkcs11": _Scheme(
        "dpop_hsm.signers.pkcs11:load_pkcs11_reference",
        "dpop_hsm.signers.pkcs11:generate_pkcs11_reference",
    ),
    "tpm2": _Scheme(
        "dpop_hsm.signers.tpm:load_tpm_reference",
        "dpop_hsm.signers.tpm:generate_tpm_reference",
    ),
}
_LOCK = threading.Lock()


def register_scheme(scheme: str, loader: Loader, *, generator: Generator | None = None) -> None:
    """Let ``load_signer("<scheme>:…")`` build a user-defined Signer (e.g. a cloud KMS).

    ``generator``, when given, lets ``generate_signer("<scheme>:…")`` create keys too; it is
    called as ``generator(ref, alg, secret)``. Registering a scheme replaces both functions.
    """
    if not scheme.isascii() or not scheme.replace("+", "").replace("-", "").isalnum():
        raise KeyReferenceError(f"invalid URI scheme {scheme!r}")
    with _LOCK:
        _SCHEMES[scheme.lower()] = _Scheme(loader, generator)


def _scheme_of(ref: str) -> str:
    head, sep, _ = ref.partition(":")
    # "C:\\key.pem" and plain relative paths are files; a scheme is 2+ chars of URI syntax.
    if sep and len(head) > 1 and head.replace("+", "").replace("-", "").isalnum():
        return head.lower()
    return "file"


def _entry(ref: object) -> tuple[str, _Scheme]:
    if not isinstance(ref, str) or not ref.strip():
        raise KeyReferenceError("key reference must be a non-empty string")
    if any(ord(ch) < 0x20 for ch in ref):
        raise KeyReferenceError("key reference contains control characters")
    scheme = _scheme_of(ref)
    with _LOCK:
        entry = _SCHEMES.get(scheme)
        known = ", ".join(sorted(_SCHEMES))
    if entry is None:
        raise KeyReferenceError(
            f"unknown key reference scheme {scheme!r} (known: {known}, or a path)"
        )
    return scheme, entry


def _lazy(target: str) -> Callable[..., Signer]:
    module_name, _, attr = target.partition(":")
    function: Callable[..., Signer] = getattr(importlib.import_module(module_name), attr)
    return function


def load_signer(
    ref: str, *, secret: SecretSource | None = None, allow_module_path: bool = False
) -> Signer:
    """Load the key named by ``ref`` and return a ready Signer.

    ``ref`` is a path or ``file:`` URI (PEM, DER or JWK), an RFC 7512 ``pkcs11:`` URI, or a
    ``tpm2:`` reference. ``secret`` is the key password, PIN or TPM auth value — a string or a
    callable returning one; ``pkcs11:`` URIs also read ``pin-source`` and ``DPOP_HSM_PIN``,
    ``tpm2:`` references ``auth-source`` and ``DPOP_HSM_TPM_AUTH``.

    A reference never makes the process load code on its own: a ``pkcs11:`` ``module-path``
    outside the trusted module directories (or ``$DPOP_HSM_PKCS11_MODULES``) and a ``tpm2:``
    TCTI other than device, tabrmd, mssim or swtpm need ``allow_module_path=True`` — pass it
    only for references you trust as much as code (one a user typed on a command line, say).
    User-registered loaders never see the flag.

    Raises KeyReferenceError for a malformed reference, UntrustedModuleError for code the
    reference may not load, MissingDependencyError when the backend's extra is not installed,
    and SignerError subclasses for key and device problems.
    """
    _, entry = _entry(ref)
    loader = entry.loader
    if isinstance(loader, str):
        return _lazy(loader)(ref, secret, allow_module_path=allow_module_path)
    return loader(ref, secret)


def generate_signer(
    ref: str,
    *,
    alg: str | None = None,
    secret: SecretSource | None = None,
    allow_module_path: bool = False,
) -> Signer:
    """Create a new key where ``ref`` says and return a Signer for it; never overwrites.

    - a path or ``file:`` URI: a PKCS#8 PEM file created with mode 0600 (``O_EXCL``: an
      existing file, or one created meanwhile, is refused); ``secret`` encrypts it;
    - ``pkcs11:``: :meth:`Pkcs11Signer.generate` — a sensitive, non-extractable key pair on the
      token; ``secret`` is the user PIN (else ``pin-source``/``DPOP_HSM_PIN``); an existing
      object with the label or id is refused;
    - ``tpm2:``: :meth:`TpmSigner.generate` — persisted at ``handle=`` (an occupied handle is
      refused) or wrapped into a new ``blob=`` file; the key's auth value comes from the
      reference's ``auth-source``, else ``secret``, else it is empty (never from the
      environment, so a key never gets an auth value by accident).

    ``alg`` defaults to ES256 (the reference's ``alg=`` for ``tpm2:``; the two must agree).
    ``allow_module_path`` as for :func:`load_signer`. Raises KeyReferenceError (malformed
    reference, target exists, no generator for the scheme), UntrustedModuleError,
    MissingDependencyError, and the backend's SignerErrors.
    """
    scheme, entry = _entry(ref)
    generator = entry.generator
    if generator is None:
        raise KeyReferenceError(
            f"key reference scheme {scheme!r} cannot create keys "
            "(register it with register_scheme(..., generator=...))"
        )
    if isinstance(generator, str):
        return _lazy(generator)(ref, alg, secret, allow_module_path=allow_module_path)
    return generator(ref, alg, secret)
