"""Token administration for setup scripts: initialize a token with no PIN on any command line.

``softhsm2-util --init-token --pin … --so-pin …`` and ``pkcs11-tool --init-token`` take the PINs
as arguments, where ``ps``, ``/proc/*/cmdline`` and shell history show them. This module does the
same through the PKCS#11 API (``C_InitToken``, then ``C_InitPIN`` as the security officer,
PKCS#11 v2.40 §5.6), so PINs travel only in memory. python-pkcs11 has no ``C_InitToken``, so the
whole sequence goes through ctypes on the function list :mod:`.cryptoki` already holds for the
process-wide, OS-locking :class:`~.cryptoki.Module` (the same module python-pkcs11 and every
signer use; it is never re-initialized here, so other signers keep their sessions).
"""

from __future__ import annotations

import ctypes

from ..._optional import requires_extra

with requires_extra("pkcs11"):
    from pkcs11.constants import TokenFlag
    from pkcs11.exceptions import PKCS11Error

from ...errors import ConfigurationError, DeviceError, TokenNotPresentError
from .ckr import CKR_OK, CKR_USER_ALREADY_LOGGED_IN, error_for_rv
from .cryptoki import Module, load_module

__all__ = ["init_token", "token_labels"]

CKF_RW_SESSION = 0x2
CKF_SERIAL_SESSION = 0x4
CKU_SO = 0


def _slots(module: Module, path: str) -> list[tuple[int, str, bool]]:
    """(slot id, token label, initialized) for every slot with a token, enumerated afresh."""
    try:
        with module.gate.call():
            found = []
            for slot in module.lib.get_slots(token_present=True):
                token = slot.get_token()
                found.append(
                    (slot.slot_id, token.label, bool(token.flags & TokenFlag.TOKEN_INITIALIZED))
                )
    except PKCS11Error as e:
        raise DeviceError(
            f"PKCS#11 module {path!r}: listing tokens failed ({type(e).__name__})"
        ) from e
    return found


def token_labels(module_path: str) -> list[str]:
    """Labels of the initialized tokens the module shows now."""
    return [label for _, label, ready in _slots(load_module(module_path), module_path) if ready]


def _padded_label(label: str) -> bytes:
    raw = label.encode("utf-8")
    if not raw or len(raw) > 32:
        raise ConfigurationError("token label must be 1 to 32 bytes of UTF-8")
    return raw.ljust(32, b" ")  # CK_TOKEN_INFO.label: blank-padded, not NUL-terminated


def _check(rv: int, what: str, call: str) -> None:
    """Raise the typed error for a non-OK result (the one CKR table); never holds a PIN."""
    if rv != CKR_OK:
        raise error_for_rv(rv, what, call)


def init_token(
    module_path: str, *, label: str, so_pin: str, user_pin: str, slot_id: int | None = None
) -> int:
    """Initialize a token as ``label``, set its user PIN, and return the slot id it is in now.

    Without ``slot_id`` the first slot whose token is not yet initialized is used, and a label
    that already exists is refused (two tokens with one label would make ``token=`` URIs
    ambiguous). With ``slot_id`` that token is (re-)initialized: PKCS#11 wipes it if the SO PIN
    is right, and a wrong SO PIN is a :class:`PinError` that leaves the token as it was.

    SoftHSM2 adds a new free slot after ``C_InitToken`` and, after the next ``C_Initialize``,
    shows the token under a serial-derived slot id; other modules may move it at once. So the
    slot list is read again and the token found by label; the returned id is valid until the
    module is re-initialized.
    """
    padded = _padded_label(label)
    module = load_module(module_path)
    functions = module.functions
    slots = _slots(module, module_path)
    if slot_id is None:
        if any(ready and name == label for _, name, ready in slots):
            raise ConfigurationError(
                f"a token labelled {label!r} exists already; refusing to re-init"
            )
        free = [sid for sid, _, ready in slots if not ready]
        if not free:
            raise TokenNotPresentError(f"PKCS#11 module {module_path!r} has no uninitialized token")
        target = free[0]
    elif slot_id in (sid for sid, _, _ in slots):
        target = slot_id
    else:
        raise TokenNotPresentError(f"PKCS#11 module {module_path!r} has no token in slot {slot_id}")

    so = so_pin.encode("utf-8")
    with module.gate.call():
        rv = functions.C_InitToken(target, so, len(so), padded)
    _check(rv, f"initializing token {label!r}", "C_InitToken")

    matches = [sid for sid, name, ready in _slots(module, module_path) if ready and name == label]
    if not matches:
        raise DeviceError(f"token {label!r} was initialized but the module no longer lists it")
    slot = target if target in matches else matches[0]

    what = f"token {label!r} was initialized but setting its user PIN failed"
    user = user_pin.encode("utf-8")
    session = ctypes.c_ulong()
    with module.gate.call():
        rv = functions.C_OpenSession(
            slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, None, None, ctypes.byref(session)
        )
    _check(rv, what, "C_OpenSession")
    try:
        with module.gate.call():
            rv = functions.C_Login(session.value, CKU_SO, so, len(so))
        if rv != CKR_USER_ALREADY_LOGGED_IN:
            _check(rv, what, "C_Login(CKU_SO)")
        try:
            with module.gate.call():
                rv = functions.C_InitPIN(session.value, user, len(user))
            _check(rv, what, "C_InitPIN")
        finally:
            with module.gate.call():
                functions.C_Logout(session.value)
    finally:
        with module.gate.call():
            functions.C_CloseSession(session.value)
    return slot
