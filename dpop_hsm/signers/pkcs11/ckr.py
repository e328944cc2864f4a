"""The one table from PKCS#11 results (``CKR_*``) to dpop_hsm errors.

Every failure of a PKCS#11 call reaches the user through :func:`error_for_rv` (a raw ``CK_RV``
from our ctypes calls: login, token administration, the signing hot path) or
:func:`error_for_exception` (python-pkcs11 raises one exception class per ``CKR_*`` code, named
after it). Both read the rows below, so a result means the same thing whichever layer saw it,
and a new code is one row. Values are from PKCS#11 v2.40 §11 (``pkcs11t.h``).

Each row also says how the signer treats the failure: ``SESSION`` faults are retried once after
the sessions are re-opened (a lost session, a re-inserted token), ``PIN`` faults are never
retried (every wrong try counts toward a lock), ``TEMPLATE`` refusals during key generation make
keygen try its relaxed template (tpm2-pkcs11 1.9 answers ``CKR_GENERAL_ERROR`` to attributes it
does not implement).

Messages name the call's subject (``what``) and the ``CKR_*`` name, never a PIN. This module
imports nothing from python-pkcs11, so it is usable without the extra.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import (
    DeviceError,
    MechanismNotSupportedError,
    PinError,
    PinLockedError,
    SignerError,
    TokenNotPresentError,
    UnsupportedKeyError,
)

__all__ = [
    "PIN",
    "SESSION",
    "TEMPLATE",
    "Ckr",
    "SessionLostError",
    "error_for_exception",
    "error_for_rv",
    "has_fault",
    "row_for_rv",
]

SESSION = "session"
PIN = "pin"
TEMPLATE = "template"

CKR_OK = 0x0
CKR_GENERAL_ERROR = 0x5
CKR_CANT_LOCK = 0xA
CKR_PIN_INCORRECT = 0xA0
CKR_PIN_INVALID = 0xA1
CKR_PIN_LEN_RANGE = 0xA2
CKR_PIN_EXPIRED = 0xA3
CKR_PIN_LOCKED = 0xA4
CKR_SESSION_CLOSED = 0xB0
CKR_SESSION_HANDLE_INVALID = 0xB3
CKR_SESSION_EXISTS = 0xB6
CKR_SESSION_READ_ONLY_EXISTS = 0xB7
CKR_TOKEN_NOT_PRESENT = 0xE0
CKR_DEVICE_REMOVED = 0x32
CKR_SLOT_ID_INVALID = 0x3
CKR_USER_ALREADY_LOGGED_IN = 0x100
CKR_USER_NOT_LOGGED_IN = 0x101
CKR_USER_PIN_NOT_INITIALIZED = 0x102
CKR_USER_ANOTHER_ALREADY_LOGGED_IN = 0x104
CKR_CRYPTOKI_NOT_INITIALIZED = 0x190
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191


class SessionLostError(DeviceError):
    """A session vanished under us (closed, or its handle is no longer valid): re-open once."""


@dataclass(frozen=True)
class Ckr:
    """One ``CKR_*`` result: its name and value, python-pkcs11's exception, our error."""

    name: str
    value: int
    exception: str | None  # python-pkcs11 exception class name (pkcs11.exceptions)
    error: type[SignerError]
    text: str
    faults: frozenset[str] = frozenset()


def _row(
    name: str,
    value: int,
    exception: str | None,
    error: type[SignerError],
    text: str,
    *faults: str,
) -> Ckr:
    return Ckr(name, value, exception, error, text, frozenset(faults))


# One row per line, in pkcs11t.h order, so that a code's whole meaning (value, python-pkcs11's
# class, our error, the words, the treatment) is the one line `grep CKR_NAME` finds and a new
# code is one new line. ruff format would spread each row over six to eight lines, so the
# table is left unformatted (and exempt from the line length: pyproject.toml).
# fmt: off
_TABLE: tuple[Ckr, ...] = (
    #    name, value, python-pkcs11 exception, our error, text, treatment
    _row("CKR_SLOT_ID_INVALID", 0x3, "SlotIDInvalid", TokenNotPresentError, "no such slot"),
    _row("CKR_GENERAL_ERROR", 0x5, "GeneralError", DeviceError, "the module failed", TEMPLATE),
    _row("CKR_FUNCTION_FAILED", 0x6, "FunctionFailed", DeviceError, "the call failed", TEMPLATE),
    _row("CKR_ATTRIBUTE_TYPE_INVALID", 0x12, "AttributeTypeInvalid", DeviceError, "the token does not know an attribute of the template", TEMPLATE),
    _row("CKR_ATTRIBUTE_VALUE_INVALID", 0x13, "AttributeValueInvalid", DeviceError, "the token refused a value of the template", TEMPLATE),
    _row("CKR_DEVICE_ERROR", 0x30, "DeviceError", DeviceError, "the device reported an error", SESSION),
    _row("CKR_DEVICE_REMOVED", 0x32, "DeviceRemoved", TokenNotPresentError, "token not present (removed)", SESSION),
    _row("CKR_KEY_HANDLE_INVALID", 0x60, "KeyHandleInvalid", DeviceError, "the key handle is no longer valid", SESSION),
    _row("CKR_KEY_TYPE_INCONSISTENT", 0x63, "KeyTypeInconsistent", UnsupportedKeyError, "the key cannot sign this way"),
    _row("CKR_MECHANISM_INVALID", 0x70, "MechanismInvalid", MechanismNotSupportedError, "the token refused the mechanism"),
    _row("CKR_MECHANISM_PARAM_INVALID", 0x71, "MechanismParamInvalid", MechanismNotSupportedError, "the token refused the mechanism's parameters"),
    _row("CKR_OBJECT_HANDLE_INVALID", 0x82, "ObjectHandleInvalid", DeviceError, "the object handle is no longer valid", SESSION),
    _row("CKR_OPERATION_ACTIVE", 0x90, "OperationActive", DeviceError, "another operation is active on the session", SESSION),
    _row("CKR_PIN_INCORRECT", 0xA0, "PinIncorrect", PinError, "the token rejected the PIN", PIN),
    _row("CKR_PIN_INVALID", 0xA1, "PinInvalid", PinError, "the token rejected the PIN", PIN),
    _row("CKR_PIN_LEN_RANGE", 0xA2, "PinLenRange", PinError, "the token rejected the PIN (wrong length)", PIN),
    _row("CKR_PIN_EXPIRED", 0xA3, "PinExpired", PinError, "the PIN has expired; change it with the token's tools", PIN),
    _row("CKR_PIN_LOCKED", 0xA4, "PinLocked", PinLockedError, "the PIN is locked"),
    _row("CKR_SESSION_CLOSED", 0xB0, "SessionClosed", SessionLostError, "the session was closed", SESSION),
    _row("CKR_SESSION_HANDLE_INVALID", 0xB3, "SessionHandleInvalid", SessionLostError, "the session is no longer valid", SESSION),
    _row("CKR_SESSION_EXISTS", 0xB6, "SessionExists", DeviceError, "sessions are open on the token; close them first"),
    _row("CKR_SESSION_READ_ONLY_EXISTS", 0xB7, "SessionReadOnlyExists", PinError, "a read-only session is open, so the security officer cannot log in"),
    _row("CKR_TEMPLATE_INCOMPLETE", 0xD0, "TemplateIncomplete", DeviceError, "the token wants more attributes in the template", TEMPLATE),
    _row("CKR_TEMPLATE_INCONSISTENT", 0xD1, "TemplateInconsistent", DeviceError, "the token refused the template", TEMPLATE),
    _row("CKR_TOKEN_NOT_PRESENT", 0xE0, "TokenNotPresent", TokenNotPresentError, "token not present", SESSION),
    _row("CKR_USER_NOT_LOGGED_IN", 0x101, "UserNotLoggedIn", PinError, "the key needs a login and no PIN was given", SESSION),
    _row("CKR_USER_PIN_NOT_INITIALIZED", 0x102, "UserPinNotInitialized", PinError, "the token's user PIN is not initialized"),
    _row("CKR_USER_ANOTHER_ALREADY_LOGGED_IN", 0x104, "AnotherUserAlreadyLoggedIn", PinError, "the other user type (security officer or user) is logged in to this token"),
    # Not a CKR code: python-pkcs11 raises it when no token has the label asked for.
    _row("no such token", -1, "NoSuchToken", TokenNotPresentError, "no such token"),
)
# fmt: on

_BY_VALUE = {row.value: row for row in _TABLE if row.value >= 0}
_BY_EXCEPTION = {row.exception: row for row in _TABLE if row.exception is not None}


def row_for_rv(rv: int) -> Ckr | None:
    """The table row of a ``CK_RV``, or None for a code the table does not name."""
    return _BY_VALUE.get(rv)


def error_for_rv(rv: int, what: str, call: str = "the call") -> SignerError:
    """Our typed error for a failed ``CK_RV``; ``what`` says what was being done, ``call`` which
    PKCS#11 function answered (used only for codes the table does not name)."""
    row = _BY_VALUE.get(rv)
    if row is None:
        return DeviceError(f"{what}: {call} failed (CKR 0x{rv:x})")
    return row.error(f"{what}: {row.text} ({row.name})")


def _row_for_exception(e: BaseException) -> Ckr | None:
    # Only python-pkcs11's own classes: ours share names with some of them (DeviceError).
    for cls in type(e).__mro__:
        if cls.__module__.partition(".")[0] != "pkcs11":
            continue
        row = _BY_EXCEPTION.get(cls.__name__)
        if row is not None:
            return row
    return None


def error_for_exception(e: BaseException, what: str) -> SignerError:
    """Our typed error for a python-pkcs11 exception (its text holds no secret).

    Our own SignerErrors pass through unchanged, so callers can map whatever a block raised.
    """
    if isinstance(e, SignerError):
        return e
    row = _row_for_exception(e)
    if row is None:
        return DeviceError(f"{what}: {type(e).__name__}")
    return row.error(f"{what}: {row.text} ({row.name})")


def has_fault(e: BaseException, fault: str) -> bool:
    """True when ``e`` (python-pkcs11 exception or our SessionLostError) is a ``fault`` failure."""
    if isinstance(e, SessionLostError):
        return fault == SESSION
    row = _row_for_exception(e)
    return row is not None and fault in row.faults
