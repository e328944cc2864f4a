"""PKCS#11 keys (HSMs, SoftHSM2, YubiKey PIV via ykcs11, tpm2-pkcs11) through python-pkcs11.

The private key is created in, and never leaves, the token. A signer holds one login and a
small pool of sessions so several threads sign in parallel where the module allows it (see
:mod:`.cryptoki` for how we make SoftHSM2 safe and parallel under python-pkcs11). A lost
session or a re-inserted token is re-opened once and the signature retried; a wrong PIN is
never retried (retries lock tokens).

Format declaration (never guess): ``CKM_ECDSA`` returns raw ``r||s`` (PKCS#11 v2.40 §2.3.1),
already the JWS form, so no conversion through ``ecdsa.py`` is needed; the hot path checks its
length. ECDSA hashing is done here in software and the token signs exactly the digest (some
tokens silently truncate longer input).

python-pkcs11 is used for everything except module initialization, login and the signing hot
path (see :mod:`.cryptoki`). A process that also uses python-pkcs11 directly on the same module
should load the module through a signer first: our re-initialization closes sessions opened
before.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any

from cryptography.exceptions import InvalidSignature

from ...algorithms import DEFAULT_ALG, AlgorithmInfo, algorithm, verify_signature
from ...errors import (
    DeviceError,
    KeyMismatchError,
    KeyNotFoundError,
    KeyReferenceError,
    MechanismNotSupportedError,
    MissingDependencyError,
    PinError,
    SignatureEncodingError,
    TokenNotPresentError,
    UnsupportedKeyError,
)
from ...jose import jwk_thumbprint
from ...jwk import PublicKey, curve, jwk_from_public_key
from ...secret_sources import SecretSource, resolve_secret
from .uri import Pkcs11Uri

try:
    from pkcs11 import Attribute, Mechanism, ObjectClass
    from pkcs11 import exceptions as p11e
    from pkcs11.mechanisms import MGF
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("pkcs11", "pkcs11") from e

from .ckr import PIN, SESSION, error_for_exception, has_fault
from .cryptoki import FORKS, Module, SessionLostError, SignBuffer, load_module
from .keygen import generate_key_pair
from .objects import PROTECTION_FLAGS, describe, find_private_key, find_token, public_key_of, read
from .pool import Entry, Generation, SessionPool

__all__ = ["Pkcs11Signer", "generate_pkcs11_reference", "load_pkcs11_reference"]

# The one CKR table, under the name this module exported before it had one.
_map_error = error_for_exception


@dataclass(frozen=True)
class _Plan:
    """How one alg signs: the mechanism, its parameter, the hashing and the output check."""

    mechanism: Mechanism
    param: Any
    digest: Callable[[bytes], bytes] | None
    coord_size: int


def _plan(info: AlgorithmInfo) -> _Plan:
    if info.kty == "EC":
        h = getattr(hashlib, info.hash_name or "sha256")

        def digest(data: bytes) -> bytes:
            return h(data).digest()  # type: ignore[no-any-return]

        return _Plan(Mechanism.ECDSA, None, digest, info.coord_size)
    if info.kty == "OKP":
        return _Plan(Mechanism.EDDSA, None, None, 0)
    if info.pss:
        # RFC 7518 §3.5: SHA-256, MGF1 with SHA-256, salt = hash length. Token defaults are
        # SHA-1 (SoftHSM2 answers ArgumentsBad), so the parameters are always explicit.
        return _Plan(Mechanism.SHA256_RSA_PKCS_PSS, (Mechanism.SHA256, MGF.SHA256, 32), None, 0)
    return _Plan(Mechanism.SHA256_RSA_PKCS, None, None, 0)


# Signed once per connect and verified with the public key found (never a JWS signing input,
# which is two base64url parts and a dot, so the signature is useless anywhere else).
_PAIR_CHALLENGE = b"dpop_hsm: is the published public key this private key's half?"


def _mismatch(described: str) -> KeyMismatchError:
    return KeyMismatchError(
        f"key {described}: its signature does not verify with the public key found by its "
        "CKA_ID/label (a public object of another key pair?); refusing to publish that key"
    )


def _prove_pair(
    module: Module, key: Any, public: PublicKey, info: AlgorithmInfo, plan: _Plan
) -> None:
    """Sign the challenge with ``key`` and verify it with ``public``; KeyMismatchError if not."""
    payload = plan.digest(_PAIR_CHALLENGE) if plan.digest is not None else _PAIR_CHALLENGE
    with module.gate.call():
        signature = key.sign(payload, mechanism=plan.mechanism, mechanism_param=plan.param)
        described = describe(key)
    try:
        verify_signature(public, info.name, signature, _PAIR_CHALLENGE)
    except InvalidSignature:
        raise _mismatch(described) from None


class _Retry(Exception):  # noqa: N818 - internal control flow, never escapes
    def __init__(self, cause: Exception) -> None:
        super().__init__(type(cause).__name__)
        self.cause = cause


class Pkcs11Signer:
    """A Signer over a private key in a PKCS#11 token, named by an RFC 7512 URI.

    ``secret`` is the user PIN (string or callback); else the URI's ``pin-source`` or
    ``pin-value``, else ``$DPOP_HSM_PIN``. ``alg`` chooses between PS256 and RS256 for RSA keys
    (default PS256) and must agree with the key otherwise. ``max_sessions`` bounds the pool.
    ``allow_module_path=True`` lets the URI's ``module-path`` name any module file (loading it
    runs its code); without it only trusted modules load (see :mod:`.locate`).

    Raises KeyReferenceError (bad URI), UntrustedModuleError (module-path not allowed),
    TokenNotPresentError (no module/token), PinError,
    KeyNotFoundError/AmbiguousKeyError (listing candidates), UnsupportedKeyError and
    MechanismNotSupportedError. Thread-safe; a context manager.
    """

    def __init__(
        self,
        uri: str | Pkcs11Uri,
        *,
        secret: SecretSource | None = None,
        alg: str | None = None,
        max_sessions: int = 8,
        allow_module_path: bool = False,
    ) -> None:
        self._parsed = uri if isinstance(uri, Pkcs11Uri) else Pkcs11Uri.parse(uri)
        if self._parsed.type not in (None, "private", "public", "cert"):
            raise KeyReferenceError(
                f"pkcs11 URI type={self._parsed.type!r} cannot name a signing key"
            )
        if self._parsed.vendor_path:
            names = ", ".join(n for n, _ in self._parsed.vendor_path)
            # RFC 7512 §2.3: an unrecognized path attribute matches no object.
            raise KeyNotFoundError(f"pkcs11 URI vendor attribute(s) {names} match no key here")
        if max_sessions < 1:
            raise KeyReferenceError("max_sessions must be >= 1")
        self._module_path = self._parsed.module(allow_module_path=allow_module_path)
        self._secret = secret
        self._requested_alg = alg
        self._pool = SessionPool(max_sessions)
        self.concurrency = max_sessions  # async adapters size their signing pool to the sessions
        self._idle = self._pool.idle  # the hot path's deque, bound once (never replaced)
        self._reopen_lock = threading.Lock()
        self._epoch = 0
        self._forks = FORKS[0]
        self._pin_rejected = False
        self._pin: str | None = self._parsed.resolve_pin(secret)
        self._module: Module = load_module(self._module_path)
        self._jwk: Mapping[str, str] = MappingProxyType({})
        self._thumbprint = ""
        self._alg = ""
        self._fast_sign: Callable[[int, int, bytes, SignBuffer], bytes | None] | None = None
        self._connect(first=True)

    # Signer members -------------------------------------------------------------------------
    @property
    def alg(self) -> str:
        return self._alg

    @property
    def public_jwk(self) -> Mapping[str, str]:
        return self._jwk

    @property
    def thumbprint(self) -> str:
        return self._thumbprint

    @property
    def uri(self) -> str:
        """This key's RFC 7512 URI (token, object, id, module; never the PIN)."""
        return str(self._key_uri)

    @property
    def always_authenticate(self) -> bool:
        """True when the token asks for the PIN before every signature (PIV slot 9c)."""
        return self._always_auth

    @property
    def parallel(self) -> bool:
        """True when the module was initialized with OS locking and signs in parallel."""
        return self._module.parallel

    def __repr__(self) -> str:
        return f"Pkcs11Signer(uri={self.uri!r}, alg={self._alg!r}, jkt={self._thumbprint!r})"

    def __enter__(self) -> Pkcs11Signer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Setup ------------------------------------------------------------------------------------
    def _open_session(self, token: Any) -> Any:
        if self._pin is not None and self._pin_rejected:
            # Retries lock tokens: a PIN the token refused once is never sent again.
            raise PinError(
                f"token {token.label!r}: the PIN was rejected before; not sending it again"
            )
        try:
            return self._module.open_session(token, pin=self._pin)
        except PinError:
            self._pin_rejected = True
            raise

    def _choose_alg(self, crv: str) -> AlgorithmInfo:
        if crv == "RSA":
            info = algorithm(self._requested_alg or "PS256")
            if info.kty != "RSA":
                raise UnsupportedKeyError(f"alg {info.name} does not fit an RSA key")
            return info
        derived = curve(crv).alg
        if self._requested_alg is not None and self._requested_alg != derived:
            raise UnsupportedKeyError(
                f"alg {self._requested_alg} does not fit a {crv} key (it signs {derived})"
            )
        return algorithm(derived)

    def _connect(self, *, first: bool) -> None:
        """Find token and key, log in once, read the public key; fill the pool's first entry.

        python-pkcs11 errors (a device failing mid-reconnect, say) leave as our SignerErrors.
        """
        try:
            self._connect_once(first=first)
        except p11e.PKCS11Error as e:
            raise _map_error(e, f"connecting to {self._parsed.token or 'the token'!r}") from e

    def _connect_once(self, *, first: bool) -> None:
        module = self._module
        token = find_token(module, self._parsed, f"PKCS#11 module {self._module_path!r}")
        session = self._open_session(token)
        try:
            key = find_private_key(
                module, session, token, self._parsed, logged_in=self._pin is not None
            )
            crv, pub = public_key_of(module, session, key)
            jwk = jwk_from_public_key(pub)
            thumbprint = jwk_thumbprint(jwk)
            if not first:
                if thumbprint != self._thumbprint:
                    raise KeyNotFoundError(
                        f"token {token.label!r}: the key named by the URI changed "
                        "(token re-initialized with another key); refusing to sign with it"
                    )
            else:
                info = self._choose_alg(crv)
                plan = _plan(info)
                with module.gate.call():
                    mechanisms = set(token.slot.get_mechanisms())
                    can_sign = read(key, Attribute.SIGN)
                    described = describe(key)
                if plan.mechanism not in mechanisms:
                    raise MechanismNotSupportedError(
                        f"token {token.label!r} lacks {plan.mechanism.name}, needed for {info.name}"
                    )
                if can_sign is False:
                    raise UnsupportedKeyError(f"key {described}: CKA_SIGN is false")
                self._alg = info.name
                self._jwk = MappingProxyType(jwk)
                self._thumbprint = thumbprint
                self._plan = plan
                # Parameterless mechanisms with a fixed output size take the ctypes hot path;
                # PSS (parameters) and PKCS#1 v1.5 (size varies) stay on python-pkcs11.
                out_size = (
                    2 * plan.coord_size if plan.coord_size else 64 if info.kty == "OKP" else 0
                )
                self._fast_sign = (
                    module.raw_signer(int(plan.mechanism), out_size) if out_size else None
                )
                self._public = pub
            with module.gate.call():
                self._always_auth = bool(read(key, Attribute.ALWAYS_AUTHENTICATE))
                label = read(key, Attribute.LABEL)
                key_id = read(key, Attribute.ID)
            # The public key is read from a separate object found by CKA_ID or label: prove it
            # belongs to this private key before publishing it (and after every reconnect: the
            # private key may have been replaced under the same name). A key that wants the
            # PIN per signature (PIV 9c, maybe touch) is proven on its first real signature.
            if self._always_auth:
                self._unproven = True
            else:
                _prove_pair(module, key, pub, algorithm(self._alg), self._plan)
                self._unproven = False
        except BaseException:
            module.close_session(session)
            raise
        self._token = token
        self._search: dict[str, Any] = {"object_class": ObjectClass.PRIVATE_KEY}
        if isinstance(key_id, bytes) and key_id:
            self._search["id"] = key_id
        if isinstance(label, str) and label:
            self._search["label"] = label
        self._key_uri = self._parsed.replace(
            token=token.label,
            object=label if isinstance(label, str) and label else self._parsed.object,
            id=key_id if isinstance(key_id, bytes) and key_id else self._parsed.id,
            type="private",
            # Keep a portable module-name when that is what the user wrote.
            module_path=None
            if self._parsed.module_name and not self._parsed.module_path
            else self._module_path,
            pin_value=None,
        )
        self._pool.connected(session, key, (module.generation, self._epoch))

    # Sessions -------------------------------------------------------------------------------
    def _acquire_slow(self) -> Entry:
        reserved = self._pool.reserve()
        if isinstance(reserved, Entry):
            return reserved
        try:
            session = self._open_session(self._token)
            try:
                with self._module.gate.call():
                    key = session.get_key(**self._search)
            except BaseException:
                self._module.close_session(session)
                raise
        except p11e.PKCS11Error as e:
            self._pool.forget()
            raise _Retry(e) from e
        except BaseException:
            self._pool.forget()
            raise
        return Entry(session, key, reserved)

    def _discard(self, entry: Entry) -> None:
        # A session from an older module generation is never closed: after C_Finalize its
        # handle number may already belong to someone else's new session.
        if entry.generation[0] == self._module.generation:
            self._module.close_session(entry.session)
        self._pool.forget()

    def _reopen(self, failed: Generation) -> None:
        """Drop every session and connect again; once per fault, whichever thread sees it."""
        with self._reopen_lock:
            if failed != self._pool.generation:
                return  # another thread already re-opened after the same fault
            self._epoch += 1
            for entry in self._pool.new_generation(self._module.generation, self._epoch):
                self._discard(entry)
            try:
                self._connect(first=False)
            except (TokenNotPresentError, KeyNotFoundError, SessionLostError):
                # Removed and re-inserted, or re-initialized: modules such as SoftHSM2 see new
                # tokens only at C_Initialize, so restart the module once and look again.
                self._module.reinitialize()
                self._epoch += 1
                self._connect(first=False)

    def _after_fork(self) -> None:
        # PKCS#11 v2.40 §6.7.7: a child must not use the parent's sessions; it initializes
        # the module again (load_module does it) and logs in on fresh sessions.
        self._forks = FORKS[0]
        self._pool.after_fork()
        self._reopen_lock = threading.Lock()
        self._module = load_module(self._module_path)
        self._epoch += 1
        self._connect(first=False)

    def key_protection(self) -> dict[str, bool | None]:
        """The private key's protection flags as the token reports them (None: not readable).

        For people and audits (``dpop-hsm demo`` prints them): a key made by :meth:`generate`
        reads sensitive, always_sensitive, never_extractable and local true, extractable false.
        """
        try:
            entry = self._idle.pop()
        except IndexError:
            try:
                entry = self._acquire_slow()
            except _Retry as r:
                raise _map_error(r.cause, "read key attributes") from r.cause
        try:
            with self._module.gate.call():
                values = {name: read(entry.key, attr) for name, attr in PROTECTION_FLAGS}
        finally:
            self._idle.append(entry)
        return {name: None if value is None else bool(value) for name, value in values.items()}

    # Signing --------------------------------------------------------------------------------
    def sign(self, signing_input: bytes) -> bytes:
        """Sign JWS input on the token; ECDSA output is raw ``r||s``.

        Raises PinError (never retried), TokenNotPresentError, SignatureEncodingError, DeviceError.
        """
        if self._forks != FORKS[0]:
            self._after_fork()
        plan = self._plan
        payload = plan.digest(signing_input) if plan.digest is not None else signing_input
        for attempt in (0, 1):
            # Before a session is taken: a context PIN that cannot be had (rejected before, no
            # source, a cancelled prompt) must not strand a pooled session.
            pin = self._context_pin() if self._always_auth else None
            try:
                entry = self._idle.pop()
            except IndexError:
                try:
                    entry = self._acquire_slow()
                except _Retry as r:
                    if attempt or not has_fault(r.cause, SESSION):
                        raise _map_error(r.cause, "sign") from r.cause
                    self._reopen(self._pool.generation)
                    continue
                except SessionLostError:
                    if attempt:
                        raise
                    self._reopen(self._pool.generation)
                    continue
            module = self._module
            gate = module.gate
            gate.enter()
            if entry.generation[0] != module.generation:
                # The module was re-initialized (another signer's reopen): this entry's handles
                # may now name other sessions or keys. Drop it unclosed and reconnect.
                gate.leave()
                self._pool.forget()
                self._reopen(entry.generation)
                continue
            try:
                fast = self._fast_sign if pin is None else None
                raw = (
                    fast(entry.session_handle, entry.key_handle, payload, entry.buf)
                    if fast is not None
                    else None
                )
                # Without the fast path, or when it failed, python-pkcs11 signs (again) and
                # raises the mapped error that the fault handling below understands.
                signature: bytes = (
                    raw
                    if raw is not None
                    else entry.key.sign(
                        payload, mechanism=plan.mechanism, mechanism_param=plan.param, pin=pin
                    )
                )
            except p11e.PKCS11Error as e:
                gate.leave()
                # Never return a failed session to the pool: after a wrong context PIN it is
                # stuck in an active sign operation (OperationActive) on SoftHSM2.
                self._discard(entry)
                pin_fault = has_fault(e, PIN)
                if attempt == 0 and has_fault(e, SESSION) and not pin_fault:
                    self._reopen(entry.generation)
                    continue
                if pin_fault and not callable(self._secret):
                    # A fixed context PIN that failed would fail again: never resend it.
                    self._pin_rejected = True
                raise _map_error(e, f"sign with {self._token.label!r}") from e
            except BaseException:
                gate.leave()
                self._discard(entry)
                raise
            gate.leave()
            # Release: back to the pool unless the pool moved on (reopen) or was closed.
            if not self._pool.release(entry):
                self._discard(entry)
            if self._unproven:  # only context-login keys: see _connect_once
                self._prove_first_signature(signing_input, signature)
            # Declared format: CKM_ECDSA returns raw r||s (PKCS#11 v2.40 §2.3.1), the JWS form
            # already; only its length is checked here, on the hot path.
            if plan.coord_size and len(signature) != 2 * plan.coord_size:
                raise SignatureEncodingError(
                    f"CKM_ECDSA returned {len(signature)} bytes; expected "
                    f"{2 * plan.coord_size} (raw r||s)"
                )
            return signature
        raise DeviceError("sign: the token failed twice")  # pragma: no cover - loop returns

    def _prove_first_signature(self, signing_input: bytes, signature: bytes) -> None:
        try:
            verify_signature(self._public, self._alg, signature, signing_input)
        except InvalidSignature:
            raise _mismatch(f"on {self._token.label!r}") from None
        self._unproven = False

    def _context_pin(self) -> str:
        # Context-specific login (PKCS#11 v2.40 §5.6 CKU_CONTEXT_SPECIFIC): ask the source each
        # time, so a prompting callback prompts per signature.
        if self._pin_rejected:
            raise PinError(
                f"key on {self._token.label!r}: the PIN was rejected before; not sending it again"
            )
        pin = resolve_secret(self._secret, what="context PIN") if self._secret is not None else None
        pin = pin if pin is not None else self._pin
        if pin is None:
            raise PinError(f"key on {self._token.label!r} needs a PIN per signature; none given")
        return pin

    def close(self) -> None:
        """Close every session (the token logs this application out with the last one)."""
        idle = self._pool.close()
        if self._forks != FORKS[0]:
            return
        for entry in idle:
            self._discard(entry)

    # Key generation -------------------------------------------------------------------------
    @classmethod
    def generate(
        cls,
        uri: str | Pkcs11Uri,
        alg: str = DEFAULT_ALG,
        *,
        secret: SecretSource | None = None,
        max_sessions: int = 8,
        allow_module_path: bool = False,
    ) -> Pkcs11Signer:
        """Generate a key pair on the token and return a signer for it.

        The private key is TOKEN, PRIVATE, SENSITIVE, non-EXTRACTABLE and SIGN-only; label and
        id come from the URI's ``object`` and ``id`` (a random 16-byte id when absent). Refuses
        (KeyReferenceError) when an object with that label or id already exists. Templates
        avoid attributes tpm2-pkcs11 rejects; it retries without the explicit "no decrypt,
        unwrap, derive" flags if the token refuses them. The PIN source is asked once.
        """
        parsed = uri if isinstance(uri, Pkcs11Uri) else Pkcs11Uri.parse(uri)
        info = algorithm(alg)
        pin = parsed.resolve_pin(secret)
        module_path = parsed.module(allow_module_path=allow_module_path)
        module = load_module(module_path)
        target = generate_key_pair(module, parsed, info, pin=pin)
        # A new key never asks for a PIN per signature: the PIN already read serves the login.
        return cls(
            target,
            secret=pin if pin is not None else secret,
            alg=info.name,
            max_sessions=max_sessions,
            allow_module_path=allow_module_path,
        )


def load_pkcs11_reference(
    ref: str, secret: SecretSource | None, *, allow_module_path: bool = False
) -> Pkcs11Signer:
    """Registry loader for ``pkcs11:`` URIs."""
    return Pkcs11Signer(ref, secret=secret, allow_module_path=allow_module_path)


def generate_pkcs11_reference(
    ref: str, alg: str | None, secret: SecretSource | None, *, allow_module_path: bool = False
) -> Pkcs11Signer:
    """Registry generator for ``pkcs11:`` URIs: :meth:`Pkcs11Signer.generate`."""
    return Pkcs11Signer.generate(
        ref, alg or DEFAULT_ALG, secret=secret, allow_module_path=allow_module_path
    )
