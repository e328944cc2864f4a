"""PKCS#11 keys (HSMs, SoftHSM2, YubiKey PIV via ykcs11, tpm2-pkcs11) through python-pkcs11.

The private key is created in, and never leaves, the token. A signer holds one login and a
small pool of sessions so several threads sign in parallel where the module allows it (see
``pkcs11_module`` for how we make SoftHSM2 safe and parallel under python-pkcs11). A lost
session or a re-inserted token is re-opened once and the signature retried; a wrong PIN is
never retried (retries lock tokens).

Format declaration (design: never guess): ``CKM_ECDSA`` returns raw ``r||s`` (PKCS#11 v2.40
§2.3.1), already the JWS form, so no conversion through ``ecdsa.py`` is needed; the hot path
checks its length. ECDSA hashing is done here in software and the token signs exactly the
digest (some tokens silently truncate longer input).

python-pkcs11 is used for everything except module initialization and login (see
``pkcs11_module``). A process that also uses python-pkcs11 directly on the same module should
load the module through a signer first: our re-initialization closes sessions opened before.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any

from ..algorithms import DEFAULT_ALG, EC_CURVE_ALGS, MIN_RSA_BITS, AlgorithmInfo, algorithm
from ..errors import (
    AmbiguousKeyError,
    DeviceError,
    KeyNotFoundError,
    KeyReferenceError,
    MechanismNotSupportedError,
    MissingDependencyError,
    PinError,
    PinLockedError,
    SignatureEncodingError,
    SignerError,
    TokenNotPresentError,
    UnsupportedKeyError,
)
from ..jose import jwk_thumbprint
from ..secret_sources import SecretSource, resolve_secret
from .pkcs11_uri import Pkcs11Uri

try:
    from asn1crypto import core as asn1
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11 import exceptions as p11e
    from pkcs11.constants import DEFAULT as P11_DEFAULT
    from pkcs11.mechanisms import MGF
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("pkcs11", "pkcs11") from e

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .pkcs11_module import FORKS, Module, SessionLostError, SignBuffer, load_module
from .software import public_jwk_of

__all__ = ["Pkcs11Signer", "load_pkcs11_reference"]

_EC_OIDS = {
    "1.2.840.10045.3.1.7": "P-256",
    "1.3.132.0.34": "P-384",
    "1.3.132.0.35": "P-521",
    "1.3.101.112": "Ed25519",
}
_EC_NAMES = {"edwards25519": "Ed25519", "ed25519": "Ed25519"}
_CURVE_OIDS = {v: k for k, v in _EC_OIDS.items()}
_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}

# Faults after which the session (or the token) is re-opened once and the signature retried.
_SESSION_FAULTS: tuple[type[Exception], ...] = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
    p11e.UserNotLoggedIn,
    p11e.OperationActive,
    p11e.DeviceError,
    SessionLostError,
)
_PIN_FAULTS = (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange, p11e.PinExpired)
# Refusals of the strict keygen template after which the relaxed one is tried; tpm2-pkcs11 1.9
# answers CKR_GENERAL_ERROR to CKA_DECRYPT/UNWRAP/DERIVE = False.
_TEMPLATE_FAULTS = (
    p11e.GeneralError,
    p11e.FunctionFailed,
    p11e.TemplateInconsistent,
    p11e.TemplateIncomplete,
    p11e.AttributeTypeInvalid,
    p11e.AttributeValueInvalid,
)


def _map_error(e: Exception, what: str) -> SignerError:
    """One of our SignerErrors for a python-pkcs11 exception (its text holds no secrets)."""
    if isinstance(e, SignerError):
        return e
    name = type(e).__name__
    if isinstance(e, p11e.PinLocked):
        return PinLockedError(f"{what}: the PIN is locked")
    if isinstance(e, _PIN_FAULTS):
        return PinError(f"{what}: the token rejected the PIN ({name})")
    if isinstance(e, p11e.UserNotLoggedIn):
        return PinError(f"{what}: the key needs a login and no PIN was given")
    if isinstance(e, p11e.TokenNotPresent | p11e.DeviceRemoved | p11e.NoSuchToken):
        return TokenNotPresentError(f"{what}: token not present ({name})")
    if isinstance(e, p11e.MechanismInvalid | p11e.MechanismParamInvalid):
        return MechanismNotSupportedError(f"{what}: the token refused the mechanism ({name})")
    if isinstance(e, p11e.KeyTypeInconsistent):
        return UnsupportedKeyError(f"{what}: the key cannot sign this way ({name})")
    return DeviceError(f"{what}: {name}")


_PROTECTION_FLAGS = (
    ("sensitive", Attribute.SENSITIVE),
    ("always_sensitive", Attribute.ALWAYS_SENSITIVE),
    ("extractable", Attribute.EXTRACTABLE),
    ("never_extractable", Attribute.NEVER_EXTRACTABLE),
    ("local", Attribute.LOCAL),
)


def _read(obj: Any, attr: Attribute) -> Any:
    """An attribute, or None when the token will not say (tolerant: tpm2-pkcs11, ykcs11)."""
    try:
        return obj[attr]
    except (p11e.PKCS11Error, KeyError, NotImplementedError):
        return None


def _describe(obj: Any) -> str:
    label = _read(obj, Attribute.LABEL)
    key_id = _read(obj, Attribute.ID)
    return f"label={label!r} id={key_id.hex() if isinstance(key_id, bytes) else None}"


def _curve_of(params: bytes) -> str:
    """JWK ``crv`` of CKA_EC_PARAMS: a named-curve OID, or (PKCS#11 3.0) a curve name string."""
    try:
        value = asn1.Asn1Value.load(params, strict=True)
    except (ValueError, TypeError) as e:
        raise UnsupportedKeyError("CKA_EC_PARAMS is not DER") from e
    if isinstance(value, asn1.ObjectIdentifier):
        crv = _EC_OIDS.get(value.dotted)
        if crv is None:
            raise UnsupportedKeyError(
                f"EC curve {value.dotted} is not usable for JWS (P-256/384/521, Ed25519 are)"
            )
        return crv
    if isinstance(value, asn1.PrintableString):
        crv = _EC_NAMES.get(str(value.native).lower())
        if crv is not None:
            return crv
    raise UnsupportedKeyError("CKA_EC_PARAMS is not a named curve (explicit parameters?)")


def _unwrap_point(raw: bytes, size: int) -> bytes:
    """CKA_EC_POINT: DER OCTET STRING (PKCS#11 v2.40) or the bare point (some tokens).

    The two are told apart by length alone: the bare point has exactly ``size`` bytes.
    """
    if len(raw) == size:
        return raw
    try:
        inner = asn1.OctetString.load(raw, strict=True).native
    except (ValueError, TypeError) as e:
        raise UnsupportedKeyError(
            f"CKA_EC_POINT has {len(raw)} bytes: neither point nor DER"
        ) from e
    if not isinstance(inner, bytes) or len(inner) != size:
        raise UnsupportedKeyError("CKA_EC_POINT does not hold a point of the curve's size")
    return inner


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


class _Entry:
    """A pooled session and the key object as seen from it (handles are per session)."""

    __slots__ = ("buf", "generation", "key", "key_handle", "session", "session_handle")

    def __init__(self, session: Any, key: Any, generation: tuple[int, int]) -> None:
        self.session = session
        self.key = key
        self.generation = generation
        # Raw handles for the ctypes fast path (Module.raw_signer).
        self.session_handle: int = session.handle
        self.key_handle: int = key.handle
        self.buf = SignBuffer()  # owned by whichever thread holds the entry


class Pkcs11Signer:
    """A Signer over a private key in a PKCS#11 token, named by an RFC 7512 URI.

    ``secret`` is the user PIN (string or callback); else the URI's ``pin-source`` or
    ``pin-value``, else ``$DPOP_HSM_PIN``. ``alg`` chooses between PS256 and RS256 for RSA keys
    (default PS256) and must agree with the key otherwise. ``max_sessions`` bounds the pool.

    Raises KeyReferenceError (bad URI), TokenNotPresentError (no module/token), PinError,
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
        self._module_path = self._parsed.module()
        self._secret = secret
        self._requested_alg = alg
        self._max = max_sessions
        self.concurrency = max_sessions  # async adapters size their signing pool to the sessions
        self._cond = threading.Condition(threading.Lock())
        self._reopen_lock = threading.Lock()
        self._idle: deque[_Entry] = deque()
        self._open = 0
        self._waiting = 0
        self._closed = False
        self._forks = FORKS[0]
        self._pin_rejected = False
        self._pin: str | None = self._parsed.resolve_pin(secret)
        self._module: Module = load_module(self._module_path)
        self._jwk: Mapping[str, str] = MappingProxyType({})
        self._thumbprint = ""
        self._alg = ""
        self._epoch = 0
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
    def _find_token(self) -> Any:
        u = self._parsed
        lib = self._module.lib
        what = f"PKCS#11 module {self._module_path!r}"
        for attr, have in (
            ("library_manufacturer", lib.manufacturer_id),
            ("library_description", lib.library_description),
        ):
            want = getattr(u, attr)
            if want is not None and want != have:
                raise TokenNotPresentError(f"{what}: {attr.replace('_', '-')} is {have!r}")
        if u.library_version is not None:
            major, _, minor = u.library_version.partition(".")
            if (int(major), int(minor or 0)) != tuple(lib.library_version):
                raise TokenNotPresentError(f"{what}: library-version does not match")
        try:
            with self._module.gate.call():
                slots = lib.get_slots(token_present=True)
        except p11e.PKCS11Error as e:
            # ykcs11 without pcscd: DeviceError; with pcscd and no key: an empty list.
            raise TokenNotPresentError(f"{what}: no slots ({type(e).__name__})") from e
        matches: list[Any] = []
        seen: list[str] = []
        for slot in slots:
            if u.slot_id is not None and slot.slot_id != u.slot_id:
                continue
            if u.slot_description is not None and slot.slot_description != u.slot_description:
                continue
            if u.slot_manufacturer is not None and slot.manufacturer_id != u.slot_manufacturer:
                continue
            try:
                with self._module.gate.call():
                    token = slot.get_token()
            except p11e.PKCS11Error:
                continue
            serial = token.serial.decode("ascii", "replace").strip()
            seen.append(f"{token.label!r} (serial {serial})")
            if (
                (u.token is not None and token.label != u.token)
                or (u.serial is not None and serial != u.serial)
                or (u.manufacturer is not None and token.manufacturer_id != u.manufacturer)
                or (u.model is not None and token.model != u.model)
            ):
                continue
            matches.append(token)
        if not matches:
            present = ", ".join(seen) if seen else "none"
            raise TokenNotPresentError(
                f"{what}: no token matches {u.describe_token()} (tokens present: {present})"
            )
        if len(matches) > 1:
            names = ", ".join(
                f"{t.label!r} (serial {t.serial.decode('ascii', 'replace')})" for t in matches
            )
            raise AmbiguousKeyError(
                f"{what}: several tokens match {u.describe_token()}: {names}; add token= or serial="
            )
        return matches[0]

    def _open_session(self, token: Any, *, rw: bool = False) -> Any:
        what = f"token {token.label!r}"
        try:
            with self._module.gate.call():
                session = token.open(rw=rw)
        except p11e.PKCS11Error as e:
            raise _map_error(e, f"{what}: open session") from e
        if self._pin is not None:
            if self._pin_rejected:
                self._close_session(session)
                # Retries lock tokens: a PIN the token refused once is never sent again.
                raise PinError(f"{what}: the PIN was rejected before; not sending it again")
            try:
                self._module.login(session.handle, self._pin, what=what)
            except PinError:
                self._pin_rejected = True
                self._close_session(session)
                raise
            except BaseException:
                self._close_session(session)
                raise
        return session

    def _close_session(self, session: Any) -> None:
        try:
            with self._module.gate.call():
                session.close()
        except p11e.PKCS11Error:
            pass  # already closed or the token is gone: nothing left to release

    def _key_template(self) -> dict[Attribute, Any]:
        template: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
        if self._parsed.object is not None:
            template[Attribute.LABEL] = self._parsed.object
        if self._parsed.id is not None:
            template[Attribute.ID] = self._parsed.id
        return template

    def _find_key(self, session: Any, token: Any) -> Any:
        template = self._key_template()
        with self._module.gate.call():
            found = list(session.get_objects(template))
        if len(found) == 1:
            return found[0]
        what = f"token {token.label!r}"
        if not found:
            with self._module.gate.call():
                keys = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
                names = "; ".join(_describe(k) for k in keys) or "none visible"
            hint = "" if self._pin is not None else " (no PIN given: private keys are hidden)"
            raise KeyNotFoundError(
                f"{what}: no private key matches {self._parsed.describe_key()}; "
                f"candidates: {names}{hint}"
            )
        with self._module.gate.call():
            names = "; ".join(_describe(k) for k in found)
        raise AmbiguousKeyError(
            f"{what}: {len(found)} private keys match {self._parsed.describe_key()}: {names}; "
            "add object= or id= to the URI"
        )

    def _public_object(self, session: Any, key: Any) -> Any | None:
        template: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PUBLIC_KEY}
        key_id = _read(key, Attribute.ID)
        label = _read(key, Attribute.LABEL)
        if key_id:
            template[Attribute.ID] = key_id
        elif label:
            template[Attribute.LABEL] = label
        else:
            return None
        found = list(session.get_objects(template))
        if len(found) > 1 and label and Attribute.LABEL not in template:
            found = [o for o in found if _read(o, Attribute.LABEL) == label]
        return found[0] if len(found) == 1 else None

    def _public_key(
        self, session: Any, key: Any
    ) -> tuple[str, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey]:
        """(JWK crv or 'RSA', public key) read from the token, checked by ``cryptography``."""
        with self._module.gate.call():
            key_type = _read(key, Attribute.KEY_TYPE)
            what = f"key {_describe(key)}"
            public = self._public_object(session, key)
            if key_type in (KeyType.EC, KeyType.EC_EDWARDS):
                params = _read(key, Attribute.EC_PARAMS) or (
                    _read(public, Attribute.EC_PARAMS) if public is not None else None
                )
                point = _read(public, Attribute.EC_POINT) if public is not None else None
            elif key_type == KeyType.RSA:
                n = _read(key, Attribute.MODULUS) or (
                    _read(public, Attribute.MODULUS) if public is not None else None
                )
                e = _read(key, Attribute.PUBLIC_EXPONENT) or (
                    _read(public, Attribute.PUBLIC_EXPONENT) if public is not None else None
                )
            else:
                raise UnsupportedKeyError(f"{what}: key type {key_type!r} is not usable for DPoP")
        if key_type == KeyType.RSA:
            if not n or not e:
                raise UnsupportedKeyError(f"{what}: the token does not reveal the RSA modulus")
            pub = rsa.RSAPublicNumbers(
                int.from_bytes(e, "big"), int.from_bytes(n, "big")
            ).public_key()
            if pub.key_size < MIN_RSA_BITS:
                raise UnsupportedKeyError(f"{what}: RSA key has {pub.key_size} bits (< 2048)")
            return "RSA", pub
        if not params:
            raise UnsupportedKeyError(f"{what}: the token does not reveal CKA_EC_PARAMS")
        crv = _curve_of(params)
        if point is None:
            raise UnsupportedKeyError(f"{what}: no public key object with the same id or label")
        try:
            if crv == "Ed25519":
                if key_type != KeyType.EC_EDWARDS:
                    raise UnsupportedKeyError(f"{what}: Ed25519 parameters on a non-EdDSA key")
                return crv, ed25519.Ed25519PublicKey.from_public_bytes(_unwrap_point(point, 32))
            curve = _CURVES[crv]
            size = 1 + 2 * ((curve.key_size + 7) // 8)
            raw_point = _unwrap_point(point, size)
            return crv, ec.EllipticCurvePublicKey.from_encoded_point(curve, raw_point)
        except ValueError as err:
            raise UnsupportedKeyError(f"{what}: CKA_EC_POINT is not a point on {crv}") from err

    def _choose_alg(self, crv: str) -> AlgorithmInfo:
        if crv == "RSA":
            info = algorithm(self._requested_alg or "PS256")
            if info.kty != "RSA":
                raise UnsupportedKeyError(f"alg {info.name} does not fit an RSA key")
            return info
        derived = "EdDSA" if crv == "Ed25519" else EC_CURVE_ALGS[crv]
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
        token = self._find_token()
        session = self._open_session(token)
        try:
            key = self._find_key(session, token)
            crv, pub = self._public_key(session, key)
            jwk = public_jwk_of(pub)
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
                with self._module.gate.call():
                    mechanisms = set(token.slot.get_mechanisms())
                    can_sign = _read(key, Attribute.SIGN)
                    described = _describe(key)
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
                    self._module.raw_signer(int(plan.mechanism), out_size) if out_size else None
                )
            with self._module.gate.call():
                self._always_auth = bool(_read(key, Attribute.ALWAYS_AUTHENTICATE))
                label = _read(key, Attribute.LABEL)
                key_id = _read(key, Attribute.ID)
        except BaseException:
            self._close_session(session)
            raise
        self._token = token
        self._search: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
        if isinstance(key_id, bytes) and key_id:
            self._search[Attribute.ID] = key_id
        if isinstance(label, str) and label:
            self._search[Attribute.LABEL] = label
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
        with self._cond:
            self._generation = (self._module.generation, self._epoch)
            self._open += 1
        self._idle.append(_Entry(session, key, self._generation))

    # Sessions -------------------------------------------------------------------------------
    # The pool's fast path is lock-free: ``deque.append``/``pop`` are atomic in CPython. Only
    # when no session is idle does a thread take ``_cond`` (to open one, or to wait for one).
    # A waiter counts itself in ``_waiting`` BEFORE its last look at the deque, and a releaser
    # appends BEFORE it looks at ``_waiting``, so no wake-up is lost.
    def _acquire_slow(self) -> _Entry:
        with self._cond:
            self._waiting += 1
            try:
                while True:
                    if self._closed:
                        raise SignerError("Pkcs11Signer is closed")
                    try:
                        return self._idle.pop()
                    except IndexError:
                        pass
                    if self._open < self._max:
                        self._open += 1
                        generation = self._generation
                        break
                    self._cond.wait(0.5)
            finally:
                self._waiting -= 1
        try:
            session = self._open_session(self._token)
            try:
                with self._module.gate.call():
                    key = session.get_key(**self._search_kwargs())
            except BaseException:
                self._close_session(session)
                raise
        except p11e.PKCS11Error as e:
            self._forget()
            raise _Retry(e) from e
        except BaseException:
            self._forget()
            raise
        return _Entry(session, key, generation)

    def _search_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"object_class": ObjectClass.PRIVATE_KEY}
        if Attribute.ID in self._search:
            kw["id"] = self._search[Attribute.ID]
        if Attribute.LABEL in self._search:
            kw["label"] = self._search[Attribute.LABEL]
        return kw

    def _forget(self) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify()

    def _discard(self, entry: _Entry) -> None:
        # A session from an older module generation is never closed: after C_Finalize its
        # handle number may already belong to someone else's new session.
        if entry.generation[0] == self._module.generation:
            self._close_session(entry.session)
        self._forget()

    def _reopen(self, failed: tuple[int, int]) -> None:
        """Drop every session and connect again; once per fault, whichever thread sees it."""
        with self._reopen_lock:
            if failed != self._generation:
                return  # another thread already re-opened after the same fault
            with self._cond:
                idle = list(self._idle)
                self._idle.clear()
                self._epoch += 1
                self._generation = (self._module.generation, self._epoch)
            for entry in idle:
                self._discard(entry)
            try:
                self._connect(first=False)
            except (TokenNotPresentError, KeyNotFoundError, SessionLostError):
                # Removed and re-inserted, or re-initialized: modules such as SoftHSM2 see new
                # tokens only at C_Initialize, so restart the module once and look again.
                self._module.reinitialize()
                with self._cond:
                    self._epoch += 1
                self._connect(first=False)

    def _after_fork(self) -> None:
        # PKCS#11 v2.40 §6.7.7: a child must not use the parent's sessions; it initializes
        # the module again (load_module does it) and logs in on fresh sessions.
        self._forks = FORKS[0]
        self._cond = threading.Condition(threading.Lock())
        self._reopen_lock = threading.Lock()
        self._idle = deque()  # the parent's sessions: never closed here (handles get reused)
        self._open = 0
        self._waiting = 0
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
                values = {name: _read(entry.key, attr) for name, attr in _PROTECTION_FLAGS}
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
                    if attempt or not isinstance(r.cause, _SESSION_FAULTS):
                        raise _map_error(r.cause, "sign") from r.cause
                    self._reopen(self._generation)
                    continue
                except SessionLostError:
                    if attempt:
                        raise
                    self._reopen(self._generation)
                    continue
            module = self._module
            gate = module.gate
            gate.enter()
            if entry.generation[0] != module.generation:
                # The module was re-initialized (another signer's reopen): this entry's handles
                # may now name other sessions or keys. Drop it unclosed and reconnect.
                gate.leave()
                self._forget()
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
                if (
                    attempt == 0
                    and isinstance(e, _SESSION_FAULTS)
                    and not isinstance(e, _PIN_FAULTS)
                ):
                    self._reopen(entry.generation)
                    continue
                if isinstance(e, _PIN_FAULTS) and not callable(self._secret):
                    # A fixed context PIN that failed would fail again: never resend it.
                    self._pin_rejected = True
                raise _map_error(e, f"sign with {self._token.label!r}") from e
            except BaseException:
                gate.leave()
                self._discard(entry)
                raise
            gate.leave()
            # Release: back to the pool unless the pool moved on (reopen) or was closed.
            if entry.generation == self._generation and not self._closed:
                self._idle.append(entry)
                if self._waiting:
                    with self._cond:
                        self._cond.notify()
            else:
                self._discard(entry)
            # Declared format: CKM_ECDSA returns raw r||s (PKCS#11 v2.40 §2.3.1), the JWS form
            # already; only its length is checked here, on the hot path.
            if plan.coord_size and len(signature) != 2 * plan.coord_size:
                raise SignatureEncodingError(
                    f"CKM_ECDSA returned {len(signature)} bytes; expected "
                    f"{2 * plan.coord_size} (raw r||s)"
                )
            return signature
        raise DeviceError("sign: the token failed twice")  # pragma: no cover - loop returns

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
        with self._cond:
            self._closed = True
            idle = list(self._idle)
            self._idle.clear()
            self._cond.notify_all()
        if self._forks != FORKS[0]:
            return
        for entry in idle:
            self._discard(entry)

    # Key generation -------------------------------------------------------------------------
    @classmethod
    def _bare(cls, parsed: Pkcs11Uri, secret: SecretSource | None) -> Pkcs11Signer:
        """Just enough of a signer to find the token and log in (no key yet): for generate()."""
        probe = cls.__new__(cls)
        probe._parsed = parsed
        probe._module_path = parsed.module()
        probe._pin = parsed.resolve_pin(secret)
        probe._pin_rejected = False
        probe._module = load_module(probe._module_path)
        return probe

    @classmethod
    def generate(
        cls,
        uri: str | Pkcs11Uri,
        alg: str = DEFAULT_ALG,
        *,
        secret: SecretSource | None = None,
        max_sessions: int = 8,
    ) -> Pkcs11Signer:
        """Generate a key pair on the token and return a signer for it.

        The private key is TOKEN, PRIVATE, SENSITIVE, non-EXTRACTABLE and SIGN-only; label and
        id come from the URI's ``object`` and ``id`` (a random 16-byte id when absent). Refuses
        (KeyReferenceError) when an object with that label or id already exists. Templates
        avoid attributes tpm2-pkcs11 rejects; it retries without the explicit "no decrypt,
        unwrap, derive" flags if the token refuses them.
        """
        parsed = uri if isinstance(uri, Pkcs11Uri) else Pkcs11Uri.parse(uri)
        info = algorithm(alg)
        key_id = parsed.id if parsed.id else secrets.token_bytes(16)
        label = parsed.object if parsed.object else f"dpop-{key_id.hex()[:12]}"
        target = parsed.replace(object=label, id=key_id, type=None)
        probe = cls._bare(target, secret)
        token = probe._find_token()
        session = probe._open_session(token, rw=True)
        what = f"token {token.label!r}"
        try:
            with probe._module.gate.call():
                clash = [
                    o
                    for t in ({Attribute.LABEL: label}, {Attribute.ID: key_id})
                    for o in session.get_objects(t)
                ]
                names = "; ".join(sorted({_describe(o) for o in clash}))
            if clash:
                raise KeyReferenceError(
                    f"{what}: objects with label {label!r} or id {key_id.hex()} already exist "
                    f"({names}); refusing to overwrite"
                )
            try:
                with probe._module.gate.call():
                    mechanisms = set(token.slot.get_mechanisms())
            except p11e.PKCS11Error as e:
                raise _map_error(e, what) from e
            _generate_pair(session, info, label, key_id, mechanisms, what, probe._module)
        finally:
            probe._close_session(session)
        return cls(target, secret=secret, alg=info.name, max_sessions=max_sessions)


class _Retry(Exception):  # noqa: N818 - internal control flow, never escapes
    def __init__(self, cause: Exception) -> None:
        super().__init__(type(cause).__name__)
        self.cause = cause


def _generate_pair(
    session: Any,
    info: AlgorithmInfo,
    label: str,
    key_id: bytes,
    mechanisms: set[Any],
    what: str,
    module: Module,
) -> None:
    common = {Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.ID: key_id}
    public: dict[Attribute, Any] = {
        **common,
        Attribute.VERIFY: True,
        Attribute.PRIVATE: False,
        # python-pkcs11 would add ENCRYPT/WRAP from its default capabilities: drop them.
        Attribute.ENCRYPT: P11_DEFAULT,
        Attribute.WRAP: P11_DEFAULT,
    }
    private: dict[Attribute, Any] = {
        **common,
        Attribute.SIGN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }
    if info.kty == "EC":
        key_type, mech, length = KeyType.EC, Mechanism.EC_KEY_PAIR_GEN, None
        public[Attribute.EC_PARAMS] = asn1.ObjectIdentifier(_CURVE_OIDS[info.crv or ""]).dump()
    elif info.kty == "OKP":
        key_type, mech, length = KeyType.EC_EDWARDS, Mechanism.EC_EDWARDS_KEY_PAIR_GEN, None
        public[Attribute.EC_PARAMS] = asn1.ObjectIdentifier(_CURVE_OIDS["Ed25519"]).dump()
    else:
        key_type, mech, length = KeyType.RSA, Mechanism.RSA_PKCS_KEY_PAIR_GEN, 2048
    if mech not in mechanisms:
        raise MechanismNotSupportedError(
            f"{what} lacks {mech.name}, needed to generate {info.name}"
        )
    for strict in (True, False):
        if not strict:  # tpm2-pkcs11 rejects attributes it does not implement: leave them out
            for attr in (Attribute.DECRYPT, Attribute.UNWRAP, Attribute.DERIVE):
                private[attr] = P11_DEFAULT
        try:
            with module.gate.call():
                session.generate_keypair(
                    key_type,
                    key_length=length,
                    mechanism=mech,
                    store=True,
                    public_template=public,
                    private_template=private,
                )
            return
        except _TEMPLATE_FAULTS as e:
            if not strict:
                raise _map_error(e, f"{what}: generate {info.name}") from e
        except p11e.PKCS11Error as e:
            raise _map_error(e, f"{what}: generate {info.name}") from e


def load_pkcs11_reference(ref: str, secret: SecretSource | None) -> Pkcs11Signer:
    """Registry loader for ``pkcs11:`` URIs."""
    return Pkcs11Signer(ref, secret=secret)
