"""One loaded PKCS#11 module per process: locking mode, login, re-initialization, fork.

Why this exists: python-pkcs11 calls ``C_Initialize(NULL)``, which tells the module that the
application will never call it from two threads at once (PKCS#11 v2.40 §5.4, §6.7). SoftHSM2
then switches its own locking off, and two threads signing — even on separate sessions —
crash the process. python-pkcs11 has no way to pass ``CK_C_INITIALIZE_ARGS``, and it does not
tolerate ``CKR_CRYPTOKI_ALREADY_INITIALIZED`` if we initialize first (verified: its
``lib.__init__`` raises). So right after python-pkcs11 has loaded and initialized the module we
call ``C_Finalize`` and ``C_Initialize({flags = CKF_OS_LOCKING_OK})`` ourselves, through ctypes
on the same ``dlopen``'ed library (``dlopen`` returns the same handle, so it is the same module
state). python-pkcs11's function table stays valid and its ``initialized`` flag stays true.
If the module refuses OS locking (``CKR_CANT_LOCK``) we fall back to ``C_Initialize(NULL)`` and
serialize every call into that module with one lock.

Login goes through ctypes too: python-pkcs11's ``Session.close()`` logs the *whole application*
out when the session was opened with a PIN, which would silently log out every other signer on
the token. Our sessions are opened without a PIN and one ``C_Login`` is made per signer;
``CKR_USER_ALREADY_LOGGED_IN`` is success (login state is per application and token,
PKCS#11 v2.40 §5.6).

Sessions are opened here as well (python-pkcs11's ``Token.open`` without a PIN, then our
``C_Login``), for the signer and for key generation alike.

Everything here is private to the pkcs11 backend.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..._optional import requires_extra

with requires_extra("pkcs11"):
    import pkcs11
    from pkcs11.exceptions import PKCS11Error

from ...errors import (
    DeviceError,
    Pkcs11ModuleError,
    Pkcs11ModuleNotFoundError,
    UnsupportedKeyError,
)
from .ckr import (
    CKR_CRYPTOKI_ALREADY_INITIALIZED,
    CKR_CRYPTOKI_NOT_INITIALIZED,
    CKR_OK,
    CKR_USER_ALREADY_LOGGED_IN,
    SessionLostError,
    error_for_exception,
    error_for_rv,
)
from .locate import require_supported_platform

__all__ = [
    "FORKS",
    "SERIALIZE_ENV",
    "Module",
    "SessionLostError",
    "SignBuffer",
    "load_module",
    "loaded_module",
]

CKF_OS_LOCKING_OK = 0x2
CKU_USER = 1

_RV = ctypes.c_ulong
_INIT = ctypes.CFUNCTYPE(_RV, ctypes.c_void_p)
_CLOSE_ALL = ctypes.CFUNCTYPE(_RV, ctypes.c_ulong)
_LOGIN = ctypes.CFUNCTYPE(_RV, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong)
# Token administration (admin.py): C_InitToken, C_InitPIN, C_OpenSession, C_CloseSession,
# C_Logout — PINs go through memory only, never through a command line.
_INIT_TOKEN = ctypes.CFUNCTYPE(
    _RV, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p
)
_INIT_PIN = ctypes.CFUNCTYPE(_RV, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong)
_OPEN_SESSION = ctypes.CFUNCTYPE(
    _RV,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_ulong),
)
_SESSION_CALL = ctypes.CFUNCTYPE(_RV, ctypes.c_ulong)


class _Mechanism(ctypes.Structure):
    # CK_MECHANISM without a parameter (CKM_ECDSA, CKM_EDDSA for Ed25519).
    _fields_ = (
        ("mechanism", ctypes.c_ulong),
        ("pParameter", ctypes.c_void_p),
        ("ulParameterLen", ctypes.c_ulong),
    )


_SIGN_INIT = ctypes.CFUNCTYPE(_RV, ctypes.c_ulong, ctypes.POINTER(_Mechanism), ctypes.c_ulong)
_SIGN = ctypes.CFUNCTYPE(
    _RV,
    ctypes.c_ulong,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
    ctypes.POINTER(ctypes.c_ulong),
)


class SignBuffer:
    """Output space for :meth:`Module.raw_signer`, reused call after call by one owner.

    Allocating the ctypes buffer per signature cost ~4 µs of a ~100 µs SoftHSM2 P-256
    signature (scripts/bench): right after the module's own work, Python code runs cache-cold.
    """

    CAPACITY = 132  # the largest fixed-size output: ES512 raw r||s
    __slots__ = ("length", "length_ref", "out")

    def __init__(self) -> None:
        self.out = ctypes.create_string_buffer(self.CAPACITY)
        self.length = ctypes.c_ulong(self.CAPACITY)
        self.length_ref = ctypes.pointer(self.length)


class _InitArgs(ctypes.Structure):
    # CK_C_INITIALIZE_ARGS (PKCS#11 v2.40 §5.4): no mutex callbacks, OS locking allowed.
    _fields_ = (
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    )


# CK_FUNCTION_LIST up to C_Sign, in the order of PKCS#11 v2.40 §5.15 (pkcs11f.h), one line per
# group of functions. Only those we call get a prototype; every other entry is a function
# pointer we never follow, so an opaque pointer of the same size keeps the layout.
_FUNCTIONS = (  # noqa: SIM905 - one line per group of functions, as in pkcs11f.h
    "C_Initialize C_Finalize C_GetInfo C_GetFunctionList"  # general purpose, §5.4
    " C_GetSlotList C_GetSlotInfo C_GetTokenInfo C_GetMechanismList C_GetMechanismInfo"
    " C_InitToken C_InitPIN C_SetPIN"  # slot and token management, §5.5
    " C_OpenSession C_CloseSession C_CloseAllSessions C_GetSessionInfo C_GetOperationState"
    " C_SetOperationState C_Login C_Logout"  # session management, §5.6
    " C_CreateObject C_CopyObject C_DestroyObject C_GetObjectSize C_GetAttributeValue"
    " C_SetAttributeValue C_FindObjectsInit C_FindObjects C_FindObjectsFinal"  # objects, §5.7
    " C_EncryptInit C_Encrypt C_EncryptUpdate C_EncryptFinal"  # §5.8
    " C_DecryptInit C_Decrypt C_DecryptUpdate C_DecryptFinal"  # §5.9
    " C_DigestInit C_Digest C_DigestUpdate C_DigestKey C_DigestFinal"  # §5.10
    " C_SignInit C_Sign"  # §5.11
).split()
_PROTOTYPES: dict[str, Any] = {
    "C_Initialize": _INIT,
    "C_Finalize": _INIT,
    "C_InitToken": _INIT_TOKEN,
    "C_InitPIN": _INIT_PIN,
    "C_OpenSession": _OPEN_SESSION,
    "C_CloseSession": _SESSION_CALL,
    "C_CloseAllSessions": _CLOSE_ALL,
    "C_Login": _LOGIN,
    "C_Logout": _SESSION_CALL,
    "C_SignInit": _SIGN_INIT,
    "C_Sign": _SIGN,
}


class _FunctionList(ctypes.Structure):
    _fields_ = (
        ("major", ctypes.c_ubyte),
        ("minor", ctypes.c_ubyte),
        *((name, _PROTOTYPES.get(name, ctypes.c_void_p)) for name in _FUNCTIONS),
    )


class _Gate:
    """Calls into a module enter here; re-initialization waits until no call is inside.

    With OS locking the module runs calls in parallel and the gate only tracks them; without
    it every call also takes one lock (PKCS#11 v2.40 §6.7.3: a NULL-initialized module must
    not be entered by two threads at once).

    Hot path, so no Condition: a caller appends to ``_inside`` and then checks ``_closing``;
    the re-initializer sets ``_closing`` and then waits for ``_inside`` to drain. ``list``
    append/pop are atomic in CPython, so either the caller sees the flag and backs off, or the
    re-initializer sees the caller and waits (the classic flag/counter handshake).
    Never nest ``enter`` calls: a nested enter during a restart would wait for itself.
    """

    def __init__(self, *, parallel: bool) -> None:
        self._inside: list[None] = []
        self._closing = False
        self._reopened = threading.Event()
        self._reopened.set()
        self._serial: threading.RLock | None = None if parallel else threading.RLock()

    def enter(self) -> None:
        inside = self._inside
        while True:
            inside.append(None)
            if not self._closing:
                break
            inside.pop()
            self._reopened.wait()
        if self._serial is not None:
            self._serial.acquire()

    def leave(self) -> None:
        if self._serial is not None:
            self._serial.release()
        self._inside.pop()

    @contextmanager
    def call(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        self._reopened.clear()
        self._closing = True
        try:
            while self._inside:  # rare path (module restart): a short poll is fine
                time.sleep(0.001)
            yield
        finally:
            self._closing = False
            self._reopened.set()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


class Module:
    """A PKCS#11 module loaded into this process, re-initialized with OS locking if allowed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()
        # Bumped whenever the module is finalized and initialized again: every session and
        # object handle from an older generation is dead (PKCS#11 v2.40 §5.4 C_Finalize).
        self.generation = 0
        self._reinit_lock = threading.Lock()
        try:
            self.lib: Any = pkcs11.lib(path)
        except PKCS11Error as e:
            # python-pkcs11 says why (the loader's dlerror: not a shared object, no
            # C_GetFunctionList, a C_Initialize failure); its text names the file only.
            raise Pkcs11ModuleError(
                f"PKCS#11 module {path!r} could not be loaded or initialized: {_first_line(e)}"
            ) from e
        try:
            self._cdll = ctypes.CDLL(path)
            table = ctypes.POINTER(_FunctionList)()
            rv = self._cdll.C_GetFunctionList(ctypes.byref(table))
        except (OSError, AttributeError) as e:
            raise Pkcs11ModuleError(f"PKCS#11 module {path!r} has no C_GetFunctionList") from e
        if rv != CKR_OK:
            raise DeviceError(f"PKCS#11 module {path!r}: C_GetFunctionList failed (0x{rv:x})")
        self._fl = table.contents
        self.serialize = _must_serialize(self.lib.manufacturer_id)
        self.parallel = self._initialize_with_locking() and not self.serialize
        self.gate = _Gate(parallel=self.parallel)

    @property
    def functions(self) -> _FunctionList:
        """The module's raw function list, for calls python-pkcs11 does not offer (admin)."""
        return self._fl

    def _initialize_with_locking(self) -> bool:
        """Finalize python-pkcs11's NULL initialization and initialize with OS locking."""
        rv = self._fl.C_Finalize(None)
        if rv not in (CKR_OK, CKR_CRYPTOKI_NOT_INITIALIZED):
            return False  # cannot re-init: stay as python-pkcs11 left it, serialized
        args = _InitArgs(flags=CKF_OS_LOCKING_OK)
        rv = self._fl.C_Initialize(ctypes.cast(ctypes.pointer(args), ctypes.c_void_p))
        if rv in (CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED):
            return True
        rv2 = self._fl.C_Initialize(None)
        if rv2 not in (CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise DeviceError(
                f"PKCS#11 module {self.path!r}: C_Initialize failed (0x{rv:x}, then 0x{rv2:x})"
            )
        return False

    def reinitialize(self) -> None:
        """Finalize and initialize again: the removed-and-reinserted token path.

        Modules such as SoftHSM2 only rescan their slots at ``C_Initialize``. Waits until no
        call is inside the module; every signer on it re-opens its sessions on its next call.
        """
        with self._reinit_lock, self.gate.exclusive():
            self.generation += 1
            self.parallel = self._initialize_with_locking() and not self.serialize
        # The gate's locking mode must match the new initialization.
        self.gate = _Gate(parallel=self.parallel)

    def after_fork(self) -> None:
        """In a forked child: the parent's sessions and login are not ours (PKCS#11 §6.7.7)."""
        self.pid = os.getpid()
        self._reinit_lock = threading.Lock()
        self.generation += 1
        self.parallel = self._initialize_with_locking() and not self.serialize
        self.gate = _Gate(parallel=self.parallel)

    def login(self, session_handle: int, pin: str, *, what: str) -> None:
        """``C_Login(CKU_USER)`` on one session; maps PIN failures, never shows the PIN."""
        data = pin.encode("utf-8")
        with self.gate.call():
            rv = self._fl.C_Login(session_handle, CKU_USER, data, len(data))
        if rv in (CKR_OK, CKR_USER_ALREADY_LOGGED_IN):
            return
        raise error_for_rv(rv, what, "C_Login")

    def open_session(self, token: Any, *, pin: str | None, rw: bool = False) -> Any:
        """A python-pkcs11 session on ``token``, logged in with ``pin`` when one is given.

        Opened without python-pkcs11's ``user_pin`` (see the module docstring: its close would
        log every signer out). Raises our PinError family for a refused PIN, mapped errors else.
        """
        what = f"token {token.label!r}"
        try:
            with self.gate.call():
                session = token.open(rw=rw)
        except PKCS11Error as e:
            raise error_for_exception(e, f"{what}: open session") from e
        if pin is not None:
            try:
                self.login(session.handle, pin, what=what)
            except BaseException:
                self.close_session(session)
                raise
        return session

    def close_session(self, session: Any) -> None:
        """Close one session; a session already gone (or a token removed) is not an error."""
        try:
            with self.gate.call():
                session.close()
        except PKCS11Error:
            pass  # already closed or the token is gone: nothing left to release

    def raw_signer(
        self, mechanism: int, out_size: int
    ) -> Callable[[int, int, bytes, SignBuffer], bytes | None]:
        """A one-shot ``C_SignInit`` + ``C_Sign`` for a parameterless mechanism.

        The hot path, so python-pkcs11 is bypassed here: its ``sign()`` builds a mechanism
        object and sizes the output with an extra call on every signature. Here the mechanism
        struct is built once and the caller passes a preallocated :class:`SignBuffer` (one per
        pooled session, so no allocation per signature) big enough for the mechanism's fixed
        output (64/96/132 bytes for ECDSA, 64 for Ed25519): one ``C_Sign`` call. Returns None
        when the module answers anything but CKR_OK: the caller then signs through
        python-pkcs11, which raises the mapped exception its fault handling understands. The
        caller holds the gate and owns the buffer for the call.
        """
        if not 0 < out_size <= SignBuffer.CAPACITY:  # the module writes up to out_size bytes
            raise UnsupportedKeyError(f"no fixed-size signing for {out_size}-byte signatures")
        mech = _Mechanism(mechanism, None, 0)
        mech_ref = ctypes.byref(mech)
        sign_init = self._fl.C_SignInit
        sign = self._fl.C_Sign

        def sign_once(session: int, key: int, data: bytes, buf: SignBuffer) -> bytes | None:
            if sign_init(session, mech_ref, key) != CKR_OK:
                return None
            length = buf.length
            length.value = out_size
            # C_Sign ends the operation on any result but CKR_BUFFER_TOO_SMALL (v2.40 §5.12),
            # which cannot happen with the mechanism's fixed output size.
            if sign(session, data, len(data), buf.out, buf.length_ref) != CKR_OK:
                return None
            return buf.out.raw[: length.value]

        return sign_once

    def close_all_sessions(self, slot_id: int) -> None:
        """``C_CloseAllSessions``: also logs the application out of the token."""
        with self.gate.call():
            self._fl.C_CloseAllSessions(slot_id)


# Modules that accept CKF_OS_LOCKING_OK but still fail when two sessions sign at once:
# tpm2-pkcs11 1.9 answers CKR_GENERAL_ERROR (one ESYS context behind every session). Matched on
# the start of CK_INFO.manufacturerID; DPOP_HSM_PKCS11_SERIALIZE=1 serializes any module.
_SERIAL_MANUFACTURERS = ("tpm2-software",)
SERIALIZE_ENV = "DPOP_HSM_PKCS11_SERIALIZE"


def _must_serialize(manufacturer_id: str) -> bool:
    if os.environ.get(SERIALIZE_ENV, "") not in ("", "0"):
        return True
    return manufacturer_id.strip().startswith(_SERIAL_MANUFACTURERS)


_MODULES: dict[str, Module] = {}
_LOCK = threading.Lock()


def load_module(path: str) -> Module:
    """The process-wide :class:`Module` for ``path`` (re-initialized in a forked child)."""
    key = os.path.realpath(path)
    with _LOCK:
        module = _MODULES.get(key)
        if module is None:
            require_supported_platform()
            if not os.path.isfile(key):
                raise Pkcs11ModuleNotFoundError(f"PKCS#11 module file {path!r} does not exist")
            module = Module(path)
            _MODULES[key] = module
        elif module.pid != os.getpid():
            module.after_fork()
        return module


def loaded_module(path: str) -> Module | None:
    """The :class:`Module` for ``path`` if this process has loaded it, else None (no loading).

    For callers that changed a module's store from outside (another process added a token or
    a key): SoftHSM2 and tpm2-pkcs11 read it at ``C_Initialize``, so they call
    :meth:`Module.reinitialize`.
    """
    with _LOCK:
        module = _MODULES.get(os.path.realpath(path))
    return module if module is not None and module.pid == os.getpid() else None


# Bumped in every forked child; signers compare it instead of calling os.getpid() per sign.
FORKS = [0]


def _after_fork_in_child() -> None:
    # Locks held by other parent threads at fork() time would never be released here.
    global _LOCK
    _LOCK = threading.Lock()
    FORKS[0] += 1


os.register_at_fork(after_in_child=_after_fork_in_child)
