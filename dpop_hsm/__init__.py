"""dpop_hsm: OAuth 2.0 DPoP (RFC 9449) with keys that never leave hardware.

Importing the package loads no hardware backend and no httpx: names are resolved on first use
(PEP 562), so ``dpop-hsm --help`` stays fast and a missing extra only matters when it is used.

``Pkcs11Signer`` and ``TpmSigner`` are importable from here (``from dpop_hsm import
Pkcs11Signer``) but are deliberately not in ``__all__``: ``from dpop_hsm import *`` and
``pydoc dpop_hsm`` then work with no extras installed and never load python-pkcs11 or
tpm2-pytss. Without its extra, importing one of them raises :class:`MissingDependencyError`
(also an ``ImportError``) naming the ``pip install`` that fixes it. ``load_signer`` reaches
both backends by key reference.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import *  # noqa: F403  (the error tree is part of the public API)
from .errors import __all__ as _error_names

if TYPE_CHECKING:
    from .ecdsa import der_to_raw, raw_to_der
    from .jose import jwk_thumbprint
    from .proof import ProofFactory
    from .requests import DPoPAuth, DPoPSession
    from .signers import Signer, load_signer, register_scheme
    from .signers.pkcs11 import Pkcs11Signer as Pkcs11Signer  # public, not in __all__
    from .signers.software import SoftwareSigner
    from .signers.tpm import TpmSigner as TpmSigner  # public, not in __all__
    from .token import Token, TokenClient
    from .verify import ReplayCache, VerifiedProof, verify_proof

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "load_signer": "dpop_hsm.signers",
    "register_scheme": "dpop_hsm.signers",
    "Signer": "dpop_hsm.signers",
    "SoftwareSigner": "dpop_hsm.signers.software",
    "Pkcs11Signer": "dpop_hsm.signers.pkcs11",
    "TpmSigner": "dpop_hsm.signers.tpm",
    "ProofFactory": "dpop_hsm.proof",
    "TokenClient": "dpop_hsm.token",
    "Token": "dpop_hsm.token",
    "DPoPAuth": "dpop_hsm.requests",
    "DPoPSession": "dpop_hsm.requests",
    "verify_proof": "dpop_hsm.verify",
    "VerifiedProof": "dpop_hsm.verify",
    "ReplayCache": "dpop_hsm.verify",
    "jwk_thumbprint": "dpop_hsm.jose",
    "der_to_raw": "dpop_hsm.ecdsa",
    "raw_to_der": "dpop_hsm.ecdsa",
}

# Everything here imports with the core dependencies only (see the module docstring for the
# two backend classes, which are resolved by __getattr__ but left out of star-imports).
__all__ = [
    "DPoPAuth",
    "DPoPSession",
    "ProofFactory",
    "ReplayCache",
    "Signer",
    "SoftwareSigner",
    "Token",
    "TokenClient",
    "VerifiedProof",
    "__version__",
    "der_to_raw",
    "jwk_thumbprint",
    "load_signer",
    "raw_to_der",
    "register_scheme",
    "verify_proof",
]
__all__ += _error_names


def __getattr__(name: str) -> Any:
    """PEP 562: import a public name's module on first use; a backend whose extra is missing
    raises MissingDependencyError here (not AttributeError, so the pip command is shown)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dpop_hsm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
