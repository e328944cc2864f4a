"""PKCS#11 keys: HSMs, SoftHSM2, YubiKey PIV (ykcs11) and tpm2-pkcs11, through python-pkcs11.

One job per module:

- :mod:`.signer` — :class:`Pkcs11Signer`: connect, sign, re-open after faults, fork;
- :mod:`.objects` — find the token, the private key and its public half;
- :mod:`.keygen` — make a non-extractable key pair on the token;
- :mod:`.cryptoki` — the loaded module: OS-locking initialization, login, the ctypes hot path;
- :mod:`.pool` — a signer's pool of logged-in sessions;
- :mod:`.ckr` — the one table from ``CKR_*`` results to our errors;
- :mod:`.admin` — token initialization with no PIN on a command line;
- :mod:`.uri` and :mod:`.locate` — RFC 7512 URIs, and where module files are found.

Names are resolved on first use, so ``dpop_hsm.signers.pkcs11.uri`` (and the URI parser's old
path ``dpop_hsm.signers.pkcs11_uri``) import without python-pkcs11 installed; asking for
:class:`Pkcs11Signer` without the extra raises :class:`~dpop_hsm.errors.MissingDependencyError`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .signer import Pkcs11Signer, generate_pkcs11_reference, load_pkcs11_reference

__all__ = ["Pkcs11Signer", "generate_pkcs11_reference", "load_pkcs11_reference"]

_LAZY = {
    "Pkcs11Signer": "signer",
    "load_pkcs11_reference": "signer",
    "generate_pkcs11_reference": "signer",
    "_map_error": "signer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
