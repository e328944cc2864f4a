"""Token administration for setup scripts: initialize a token with no PIN on any command line.

``softhsm2-util --init-token --pin … --so-pin …`` and ``pkcs11-tool --init-token`` take the PINs
as arguments, where ``ps`` and shell history show them. This module does the same through the
PKCS#11 API (``C_InitToken``, then ``C_InitPIN`` as the security officer), so PINs travel only in
memory. python-pkcs11 has ``init_pin`` but no ``C_InitToken``; that one call goes through ctypes
on the function list :mod:`pkcs11_module` already holds.
"""

from __future__ import annotations

import ctypes

from pkcs11.constants import TokenFlag
from pkcs11.exceptions import PKCS11Error

from ..errors import ConfigurationError, DeviceError, TokenNotPresentError
from .pkcs11_module import load_module, login_error

__all__ = ["init_token", "token_labels"]

CKR_OK = 0x0
CKR_PIN_INCORRECT = 0xA0
_INIT_TOKEN = ctypes.CFUNCTYPE(
    ctypes.c_ulong, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p
)


def token_labels(module_path: str) -> list[str]:
    """Labels of the initialized tokens the module shows now."""
    module = load_module(module_path)
    try:
        with module.gate.exclusive():
            tokens = [slot.get_token() for slot in module.lib.get_slots(token_present=True)]
    except PKCS11Error as e:
        raise DeviceError(f"PKCS#11 module {module_path!r}: listing tokens failed") from e
    return [t.label for t in tokens if t.flags & TokenFlag.TOKEN_INITIALIZED]


def _padded_label(label: str) -> bytes:
    raw = label.encode("utf-8")
    if not raw or len(raw) > 32:
        raise ConfigurationError("token label must be 1 to 32 bytes of UTF-8")
    return raw.ljust(32, b" ")  # CK_TOKEN_INFO.label: blank-padded, not NUL-terminated


def init_token(module_path: str, *, label: str, so_pin: str, user_pin: str) -> None:
    """Initialize the first uninitialized token with ``label`` and set its user PIN.

    Refuses a label that already exists (no token is ever wiped here). SoftHSM2 moves a freshly
    initialized token to a new slot id and only rescans slots at ``C_Initialize``, so the module
    is re-initialized before the token is opened by label.
    """
    module = load_module(module_path)
    if label in token_labels(module_path):
        raise ConfigurationError(f"a token labelled {label!r} exists already; refusing to re-init")
    with module.gate.exclusive():
        free = [
            slot
            for slot in module.lib.get_slots(token_present=True)
            if not slot.get_token().flags & TokenFlag.TOKEN_INITIALIZED
        ]
    if not free:
        raise TokenNotPresentError(f"PKCS#11 module {module_path!r} has no uninitialized token")
    pin = so_pin.encode("utf-8")
    init = ctypes.cast(module._fl.C_InitToken, _INIT_TOKEN)
    with module.gate.exclusive():
        rv = init(free[0].slot_id, pin, len(pin), _padded_label(label))
    if rv != CKR_OK:
        if rv == CKR_PIN_INCORRECT:
            raise login_error(rv, f"initializing token {label!r}")
        raise DeviceError(f"initializing token {label!r}: C_InitToken failed (0x{rv:x})")
    module.reinitialize()
    try:
        with module.gate.exclusive():
            token = module.lib.get_token(token_label=label)
            # Closing a session opened with so_pin logs the security officer out again.
            with token.open(rw=True, so_pin=so_pin) as session:
                session.init_pin(user_pin)
    except PKCS11Error as e:
        raise DeviceError(
            f"token {label!r} was initialized but setting its user PIN failed ({type(e).__name__})"
        ) from e
