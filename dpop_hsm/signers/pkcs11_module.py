"""Old import path of :mod:`dpop_hsm.signers.pkcs11.cryptoki` (the loaded module); kept working.

The ``CKR_*`` constants and :func:`login_error` now live in :mod:`dpop_hsm.signers.pkcs11.ckr`,
the one table from PKCS#11 results to our errors.
"""

from __future__ import annotations

from ..errors import SignerError
from .pkcs11.ckr import (
    CKR_CANT_LOCK,
    CKR_CRYPTOKI_ALREADY_INITIALIZED,
    CKR_CRYPTOKI_NOT_INITIALIZED,
    CKR_DEVICE_REMOVED,
    CKR_OK,
    CKR_PIN_EXPIRED,
    CKR_PIN_INCORRECT,
    CKR_PIN_INVALID,
    CKR_PIN_LEN_RANGE,
    CKR_PIN_LOCKED,
    CKR_SESSION_CLOSED,
    CKR_SESSION_HANDLE_INVALID,
    CKR_TOKEN_NOT_PRESENT,
    CKR_USER_ALREADY_LOGGED_IN,
    CKR_USER_ANOTHER_ALREADY_LOGGED_IN,
    CKR_USER_PIN_NOT_INITIALIZED,
    SessionLostError,
    error_for_rv,
)
from .pkcs11.cryptoki import (
    CKF_OS_LOCKING_OK,
    CKU_USER,
    FORKS,
    SERIALIZE_ENV,
    Module,
    SignBuffer,
    load_module,
)

__all__ = [
    "CKF_OS_LOCKING_OK",
    "CKR_CANT_LOCK",
    "CKR_CRYPTOKI_ALREADY_INITIALIZED",
    "CKR_CRYPTOKI_NOT_INITIALIZED",
    "CKR_DEVICE_REMOVED",
    "CKR_OK",
    "CKR_PIN_EXPIRED",
    "CKR_PIN_INCORRECT",
    "CKR_PIN_INVALID",
    "CKR_PIN_LEN_RANGE",
    "CKR_PIN_LOCKED",
    "CKR_SESSION_CLOSED",
    "CKR_SESSION_HANDLE_INVALID",
    "CKR_TOKEN_NOT_PRESENT",
    "CKR_USER_ALREADY_LOGGED_IN",
    "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
    "CKR_USER_PIN_NOT_INITIALIZED",
    "CKU_USER",
    "FORKS",
    "SERIALIZE_ENV",
    "Module",
    "SessionLostError",
    "SignBuffer",
    "load_module",
    "login_error",
]


def login_error(rv: int, what: str) -> SignerError:
    """The typed error for a failed ``C_Login`` (the one CKR table)."""
    return error_for_rv(rv, what, "C_Login")
