"""TPM 2.0 keys through tpm2-pytss (ESAPI): the key is created inside the TPM and never leaves.

Two ways to name a key (grammar in :mod:`dpop_hsm.signers.tpm_ref`)::

    tpm2:handle=0x81010001;tcti=swtpm:host=127.0.0.1,port=2321
    tpm2:blob=dpop-key.tss;auth-source=env:DPOP_KEY_AUTH

A *persistent* key sits in the TPM's NV memory at a handle: signing is one TPM2_Sign and no
transient object is ever loaded. A *blob* key is a ``TSS2 PRIVATE KEY`` PEM file (the TCG key
file format also used by tpm2-openssl and tpm2-tss-engine): its private area is encrypted by the
TPM's storage primary key, which is re-derived on demand from the standard ECC P-256 template
(the same template on every TPM, so nothing but the file has to be kept). The first signature
loads the key once and keeps a TPM2_ContextSave blob in memory; each signature then is
ContextLoad → Sign → FlushContext. Between two signatures the signer holds **no transient
object**, on success and on error: TPMs have only a few object slots (swtpm: 3) and without a
resource manager a leaked object breaks the next caller — in this process or another one.

Signing follows our Signer contract: the JWS signing input is hashed in software (SHA-256 for
ES256 on P-256, SHA-384 for ES384 on P-384), TPM2_Sign signs the digest with the ECDSA scheme,
and the TPM's ``r`` and ``s`` (TPM2B buffers, possibly short) become raw ``r||s`` through
:func:`dpop_hsm.ecdsa.rs_to_raw` (RFC 7518 §3.4).

Faults: a TPM that stops answering mid-call (swtpm restarted, tpm2-abrmd bounced) is reconnected
once and the call retried once; a TPM that cannot be reached is :class:`TokenNotPresentError`;
a missing handle is :class:`KeyNotFoundError`; a rejected auth value is :class:`PinError` and is
never retried — every failure counts toward the TPM's dictionary-attack (DA) lockout, after which
the TPM answers :class:`PinLockedError` until its recovery time has passed (or
``tpm2_dictionarylockout --clear-lockout`` with the lockout auth). Keys we create are
DA-protected (no ``noDA`` attribute): a guessable auth value is exactly what DA protects.

The TSS prints warnings to stderr on its own (e.g. a failed connect). Unless ``TSS2_LOG`` is
set, this module sets it to ``all+NONE`` before tpm2-pytss is imported; the TSS reads it at its
first log call, so setting it any time before the first TPM command would also work.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec

from ..ecdsa import rs_to_raw
from ..errors import (
    DeviceError,
    KeyNotFoundError,
    KeyReferenceError,
    MechanismNotSupportedError,
    MissingDependencyError,
    PinError,
    PinLockedError,
    SignerError,
    TokenNotPresentError,
    UnsupportedKeyError,
)
from ..jose import jwk_thumbprint
from ..secret_sources import SecretSource, resolve_secret
from .software import public_jwk_of
from .tpm_ref import TpmReference, default_tcti, parse_handle, resolve_auth

os.environ.setdefault("TSS2_LOG", "all+NONE")  # before the TSS can log anything (see above)

try:
    from tpm2_pytss import (
        ESAPI,
        ESYS_TR,
        TPM2_ALG,
        TPM2_CAP,
        TPM2_ECC,
        TPM2_RC,
        TPM2_ST,
        TPM2B_AUTH,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPMA_OBJECT,
        TPMS_ECC_PARMS,
        TPMS_SENSITIVE_CREATE,
        TPMT_ECC_SCHEME,
        TPMT_KDF_SCHEME,
        TPMT_PUBLIC,
        TPMT_SIG_SCHEME,
        TPMT_SYM_DEF_OBJECT,
        TPMT_TK_HASHCHECK,
        TPMU_PUBLIC_PARMS,
        TPMU_SYM_KEY_BITS,
        TPMU_SYM_MODE,
        TSS2_Exception,
    )
    from tpm2_pytss.constants import TPM2_RH, TSS2_RC
    from tpm2_pytss.tsskey import TSSPrivKey
except (ImportError, OSError) as _e:  # OSError: the TSS shared libraries are missing
    raise MissingDependencyError("tpm2_pytss", "tpm") from _e

__all__ = ["TpmReference", "TpmSigner", "load_tpm_reference"]

T = TypeVar("T")

_MAX_BLOB = 64 * 1024


@dataclass(frozen=True)
class _Curve:
    alg: str
    tpm_curve: int
    hash_alg: int
    hash_name: str
    size: int
    crypto_curve: Callable[[], ec.EllipticCurve]


_CURVES: dict[str, _Curve] = {
    "ES256": _Curve("ES256", TPM2_ECC.NIST_P256, TPM2_ALG.SHA256, "sha256", 32, ec.SECP256R1),
    "ES384": _Curve("ES384", TPM2_ECC.NIST_P384, TPM2_ALG.SHA384, "sha384", 48, ec.SECP384R1),
}
_BY_TPM_CURVE = {int(c.tpm_curve): c for c in _CURVES.values()}

# The storage primary: TCG "TPM 2.0 Keys for Device Identity and Attestation" / Provisioning
# Guidance SRK template (ECC NIST P-256, AES-128-CFB, restricted decrypt, empty unique) — the
# parent the TSS2 key file format means by "parent = TPM2_RH_OWNER". Being a template, not a
# stored object, it is recreated on demand and flushed after use.
_PRIMARY_ATTRS = (
    TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
    | TPMA_OBJECT.NODA
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
)
# Our signing keys: sign-only, unrestricted (signs external digests), never exportable, made by
# the TPM's RNG, used with the auth value. DA-protected on purpose (no NODA).
_KEY_ATTRS = (
    TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)

_TCTI_LAYER = int(TSS2_RC.TCTI_RC_LAYER)
_LAYER_MASK = int(TSS2_RC.RC_LAYER_MASK)


def _primary_template() -> Any:
    return TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.ECC,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=_PRIMARY_ATTRS,
            authPolicy=b"",
            parameters=TPMU_PUBLIC_PARMS(
                eccDetail=TPMS_ECC_PARMS(
                    symmetric=TPMT_SYM_DEF_OBJECT(
                        algorithm=TPM2_ALG.AES,
                        keyBits=TPMU_SYM_KEY_BITS(aes=128),
                        mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
                    ),
                    scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
                    curveID=TPM2_ECC.NIST_P256,
                    kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
                )
            ),
        )
    )


def _key_template(curve: _Curve) -> Any:
    scheme = TPMT_ECC_SCHEME(scheme=TPM2_ALG.ECDSA)
    scheme.details.ecdsa.hashAlg = curve.hash_alg  # bind the key to ECDSA with its hash
    return TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.ECC,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=_KEY_ATTRS,
            authPolicy=b"",
            parameters=TPMU_PUBLIC_PARMS(
                eccDetail=TPMS_ECC_PARMS(
                    symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                    scheme=scheme,
                    curveID=curve.tpm_curve,
                    kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
                )
            ),
        )
    )


def _sig_scheme(curve: _Curve) -> Any:
    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
    scheme.details.any.hashAlg = curve.hash_alg
    return scheme


def _is_link_error(e: TSS2_Exception) -> bool:
    """True when the TPM did not answer (connection lost), as opposed to answering 'no'."""
    return (int(e.rc) & _LAYER_MASK) == _TCTI_LAYER or int(e.rc) == int(TPM2_RC.INITIALIZE)


def _map_error(e: TSS2_Exception, *, what: str, tcti: str) -> SignerError:
    """A TSS return code → our typed error. ``str(e)`` is the TSS's decoding of the code only."""
    rc = int(e.rc)
    if _is_link_error(e):
        return TokenNotPresentError(f"{what}: no TPM answers at TCTI {tcti!r} ({e})")
    if rc & _LAYER_MASK == 0:  # the TPM itself answered
        base = int(e.error)
        if base in (int(TPM2_RC.AUTH_FAIL), int(TPM2_RC.BAD_AUTH)):
            return PinError(
                f"{what}: the TPM rejected the auth value (not retried: each failure counts "
                "toward the TPM's dictionary-attack lockout)"
            )
        if base == int(TPM2_RC.LOCKOUT):
            return PinLockedError(
                f"{what}: the TPM is in dictionary-attack lockout after too many wrong auth "
                "values; wait for its recovery time or clear it with the lockout auth"
            )
        if base == int(TPM2_RC.HANDLE):
            return KeyNotFoundError(f"{what}: the TPM has no object at that handle ({e})")
        if base == int(TPM2_RC.OBJECT_MEMORY):
            return DeviceError(
                f"{what}: the TPM is out of object slots — another client left transient objects "
                "loaded (tpm2_flushcontext -t) or needs a resource manager (tpmrm0, tpm2-abrmd)"
            )
        if base in (int(TPM2_RC.CURVE), int(TPM2_RC.SCHEME), int(TPM2_RC.HASH)):
            return MechanismNotSupportedError(f"{what}: the TPM does not support this ({e})")
    return DeviceError(f"{what}: TPM error {rc:#x} ({e})")


def _connect(tcti: str, what: str) -> Any:
    try:
        return ESAPI(tcti)
    except TSS2_Exception as e:
        raise _map_error(e, what=what, tcti=tcti) from e


def _ecc_curve_ids(esapi: Any) -> set[int]:
    _, data = esapi.get_capability(TPM2_CAP.ECC_CURVES, 0, 64)
    curves = data.data.eccCurves  # index by count: tpm2-pytss 3.0 fails iterating empty TPMLs
    return {int(curves[i]) for i in range(curves.count)}


def _public_of(public: Any, *, what: str) -> tuple[_Curve, dict[str, str]]:
    """Check a key's public area is a DPoP signing key and build its JWK from it."""
    area = public.publicArea
    if int(area.type) != int(TPM2_ALG.ECC):
        raise UnsupportedKeyError(f"{what}: not an ECC key (ES256/ES384 need P-256/P-384)")
    attrs = int(area.objectAttributes)
    if not attrs & int(TPMA_OBJECT.SIGN_ENCRYPT) or attrs & int(TPMA_OBJECT.RESTRICTED):
        raise UnsupportedKeyError(
            f"{what}: not an unrestricted signing key (needs sign, must not be restricted)"
        )
    detail = area.parameters.eccDetail
    curve = _BY_TPM_CURVE.get(int(detail.curveID))
    if curve is None:
        raise UnsupportedKeyError(f"{what}: ECC curve {detail.curveID} is not P-256 or P-384")
    scheme = int(detail.scheme.scheme)
    if scheme not in (int(TPM2_ALG.NULL), int(TPM2_ALG.ECDSA)) or (
        scheme == int(TPM2_ALG.ECDSA) and int(detail.scheme.details.ecdsa.hashAlg) != curve.hash_alg
    ):
        raise UnsupportedKeyError(f"{what}: key scheme is not ECDSA with {curve.hash_name}")
    x = int.from_bytes(bytes(area.unique.ecc.x), "big")
    y = int.from_bytes(bytes(area.unique.ecc.y), "big")
    try:
        point = ec.EllipticCurvePublicNumbers(x, y, curve.crypto_curve()).public_key()
    except ValueError as e:
        raise UnsupportedKeyError(f"{what}: public point is not on the curve") from e
    return curve, public_jwk_of(point)  # coordinates left-padded to full length


def _read_blob(path: Path) -> Any:
    try:
        if path.stat().st_size > _MAX_BLOB:
            raise KeyReferenceError(f"TPM key blob {str(path)!r} is larger than 64 KiB")
        data = path.read_bytes()
    except OSError as e:
        raise KeyReferenceError(f"cannot read TPM key blob {str(path)!r}: {e.strerror}") from e
    try:
        return TSSPrivKey.from_pem(data)
    except (ValueError, TypeError, IndexError, TSS2_Exception) as e:
        raise KeyReferenceError(
            f"{str(path)!r} is not a TSS2 PRIVATE KEY file (TPM 2.0 key file PEM)"
        ) from e


class TpmSigner:
    """A Signer whose ECC key lives in a TPM 2.0, reached through tpm2-pytss (ESAPI).

    Thread-safe: ESAPI contexts are not, so one lock serializes every TPM command of this
    signer (a TPM executes one command at a time anyway). Use as a context manager or call
    :meth:`close`. Raises :class:`TokenNotPresentError`, :class:`KeyNotFoundError`,
    :class:`PinError`, :class:`UnsupportedKeyError`, :class:`DeviceError`.
    """

    concurrency = 1  # one lock serializes its TPM commands: async adapters use one worker

    def __init__(
        self, reference: str | TpmReference, *, secret: SecretSource | None = None
    ) -> None:
        ref = reference if isinstance(reference, TpmReference) else TpmReference.parse(reference)
        self._ref = ref
        self._tcti = ref.resolved_tcti()
        self._what = f"TPM key at {ref.describe_key()}"
        explicit = secret is not None or ref.auth_source is not None
        auth = resolve_auth(secret, ref.auth_source, what=f"auth value for {self._what}")
        self._blob: Any = None
        if ref.blob is not None:
            self._blob = _read_blob(ref.blob)
            if self._blob.empty_auth and not explicit:
                auth = None  # the key file says "no auth": ignore an ambient $DPOP_HSM_TPM_AUTH
            elif not self._blob.empty_auth and not auth:
                # Refuse before the TPM sees an empty auth value: it would count as a DA failure.
                raise PinError(f"{self._what} needs an auth value and none was given")
        self._auth = TPM2B_AUTH((auth or "").encode("utf-8"))
        self._lock = threading.Lock()
        self._esapi: Any = None
        self._key_tr: Any = None  # persistent key: its ESYS_TR in the current ESAPI context
        self._saved: Any = None  # blob key: TPMS_CONTEXT from TPM2_ContextSave
        self._ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        self._closed = False
        try:
            with self._lock:
                public = self._run(self._read_public)
            curve, jwk = _public_of(public, what=self._what)
            if ref.alg is not None and ref.alg != curve.alg:
                raise UnsupportedKeyError(f"{self._what} is a {curve.alg} key, not {ref.alg}")
        except BaseException:
            self.close()
            raise
        self._curve = curve
        self._scheme = _sig_scheme(curve)
        self._hash = getattr(hashlib, curve.hash_name)
        self._jwk: Mapping[str, str] = MappingProxyType(jwk)
        self._thumbprint = jwk_thumbprint(self._jwk)

    @classmethod
    def from_reference(cls, ref: str, secret: SecretSource | None = None) -> TpmSigner:
        """Open the key named by a ``tpm2:`` reference (see the module docstring)."""
        return cls(ref, secret=secret)

    # Signer members -------------------------------------------------------------------------
    @property
    def alg(self) -> str:
        return self._curve.alg

    @property
    def public_jwk(self) -> Mapping[str, str]:
        return self._jwk

    @property
    def thumbprint(self) -> str:
        return self._thumbprint

    @property
    def reference(self) -> TpmReference:
        """The parsed reference this signer was opened from (no secret in it)."""
        return self._ref

    def sign(self, signing_input: bytes) -> bytes:
        """ECDSA over ``signing_input``: hashed here, the digest signed by the TPM; raw r||s."""
        digest = self._hash(signing_input).digest()
        with self._lock:
            sig = self._run(lambda esapi: self._sign_digest(esapi, digest))
        ecdsa = sig.signature.ecdsa
        return rs_to_raw(  # TPM2B r and s may be short: rs_to_raw left-pads (RFC 7518 §3.4)
            int.from_bytes(bytes(ecdsa.signatureR), "big"),
            int.from_bytes(bytes(ecdsa.signatureS), "big"),
            self._curve.size,
        )

    def close(self) -> None:
        """Drop the TPM connection. Nothing transient is loaded, so nothing needs flushing."""
        with self._lock:
            self._closed = True
            self._disconnect()

    def __enter__(self) -> TpmSigner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        jkt = getattr(self, "_thumbprint", None)
        return f"TpmSigner(ref={self._ref.to_string()!r}, tcti={self._tcti!r}, jkt={jkt!r})"

    # TPM plumbing (every method below runs with self._lock held) -----------------------------
    def _disconnect(self) -> None:
        esapi, self._esapi, self._key_tr, self._saved = self._esapi, None, None, None
        if esapi is not None:
            esapi.close()

    def _ensure(self) -> Any:
        if self._closed:
            raise DeviceError(f"{self._what}: the signer is closed")
        if self._esapi is None:
            esapi = _connect(self._tcti, self._what)
            try:
                if self._ref.handle is not None:
                    key_tr = esapi.tr_from_tpmpublic(self._ref.handle)
                    esapi.tr_set_auth(key_tr, self._auth)
                    self._key_tr = key_tr
            except BaseException:
                esapi.close()
                raise
            self._esapi = esapi
        return self._esapi

    def _run(self, op: Callable[[Any], T]) -> T:
        """Run ``op`` against the TPM; on a lost connection reconnect once and retry once.

        Only link failures are retried: an auth failure is final (DA lockout), and a TPM that
        answered with an error would answer the same again.
        """
        try:
            return op(self._ensure())
        except TSS2_Exception as e:
            if not _is_link_error(e):
                raise _map_error(e, what=self._what, tcti=self._tcti) from e
        self._disconnect()  # swtpm restarted, abrmd bounced, TPM reset: start afresh
        try:
            return op(self._ensure())
        except TSS2_Exception as e:
            self._disconnect()
            raise _map_error(e, what=self._what, tcti=self._tcti) from e

    def _read_public(self, esapi: Any) -> Any:
        if self._blob is not None:
            # Load once now: proves the blob belongs to this TPM (wrong TPM → integrity error)
            # and primes the saved context for the first signature.
            key = self._load_blob_key(esapi)
            esapi.flush_context(key)
            return self._blob.public
        public, _, _ = esapi.read_public(self._key_tr)
        return public

    def _load_blob_key(self, esapi: Any) -> Any:
        """A transient handle for the blob key; the caller must flush it (and does, always)."""
        if self._saved is not None:
            try:
                return esapi.context_load(self._saved)
            except TSS2_Exception as e:
                if _is_link_error(e):
                    raise
                self._saved = None  # saved contexts die with a TPM reset: reload from the blob
        primary = esapi.create_primary(None, _primary_template(), ESYS_TR.OWNER)[0]
        try:
            key = esapi.load(primary, self._blob.private, self._blob.public)
        except TSS2_Exception as e:
            if not _is_link_error(e) and int(e.error) == int(TPM2_RC.INTEGRITY):
                raise KeyNotFoundError(
                    f"{self._what} was not created by this TPM (or the TPM was cleared since): "
                    "its storage primary key cannot unwrap it"
                ) from e
            raise
        finally:
            esapi.flush_context(primary)
        try:
            self._saved = esapi.context_save(key)
        except BaseException:
            esapi.flush_context(key)
            raise
        return key

    def _sign_digest(self, esapi: Any, digest: bytes) -> Any:
        if self._key_tr is not None:  # persistent: nothing to load, nothing to flush
            return esapi.sign(self._key_tr, digest, self._scheme, self._ticket)
        key = self._load_blob_key(esapi)
        try:
            esapi.tr_set_auth(key, self._auth)
            return esapi.sign(key, digest, self._scheme, self._ticket)
        finally:
            esapi.flush_context(key)

    # Key management ---------------------------------------------------------------------------
    @classmethod
    def generate(
        cls,
        *,
        tcti: str | None = None,
        handle: int | None = None,
        blob_path: str | os.PathLike[str] | None = None,
        alg: str = "ES256",
        auth: SecretSource | None = None,
    ) -> TpmSigner:
        """Create a key in the TPM and return a signer for it.

        Exactly one of ``handle`` (persist the key there with TPM2_EvictControl; an occupied
        handle is refused, never overwritten) or ``blob_path`` (write a ``TSS2 PRIVATE KEY`` PEM
        file, mode 0600; an existing file is refused). The key is ECC P-256 (ES256) or P-384
        (ES384 — only when the TPM lists the curve), sign-only, fixedTPM/fixedParent,
        sensitiveDataOrigin, userWithAuth, under the standard storage primary of the owner
        hierarchy (whose auth must be empty, the usual setup). ``auth`` is the key's auth value
        (default: empty); only this argument is read — not ``$DPOP_HSM_TPM_AUTH`` — so a key
        never gets an auth value by accident.
        """
        if (handle is None) == (blob_path is None):
            raise KeyReferenceError("TpmSigner.generate needs exactly one of handle or blob_path")
        curve = _CURVES.get(alg)
        if curve is None:
            raise UnsupportedKeyError(f"TPM keys support ES256 and ES384, not {alg!r}")
        tcti_str = tcti or default_tcti()
        secret = resolve_secret(auth, what="auth value for the new TPM key") or ""
        if handle is not None:
            handle = parse_handle(str(handle))
            ref = TpmReference(handle=handle, tcti=tcti)
            what = f"new TPM key at persistent handle {handle:#010x}"
        else:
            path = Path(os.fspath(blob_path))  # type: ignore[arg-type]
            if path.exists():
                raise KeyReferenceError(f"refusing to overwrite existing file {str(path)!r}")
            ref = TpmReference(blob=path, tcti=tcti)
            what = f"new TPM key blob {str(path)!r}"
        esapi = _connect(tcti_str, what)
        try:
            try:
                if int(curve.tpm_curve) not in _ecc_curve_ids(esapi):
                    raise MechanismNotSupportedError(
                        f"{what}: this TPM does not support the {curve.alg} curve"
                    )
                if handle is not None and _persistent_in_use(esapi, handle):
                    raise KeyReferenceError(
                        f"persistent handle {handle:#010x} is already in use; refusing to "
                        f"overwrite it (evict it first: tpm2_evictcontrol -c {handle:#010x})"
                    )
                sensitive = TPM2B_SENSITIVE_CREATE(
                    TPMS_SENSITIVE_CREATE(userAuth=TPM2B_AUTH(secret.encode("utf-8")))
                )
                primary = esapi.create_primary(None, _primary_template(), ESYS_TR.OWNER)[0]
                try:
                    private, public, _, _, _ = esapi.create(
                        primary, sensitive, _key_template(curve)
                    )
                    if handle is not None:
                        key = esapi.load(primary, private, public)
                        try:
                            esapi.evict_control(ESYS_TR.OWNER, key, handle)
                        finally:
                            esapi.flush_context(key)
                finally:
                    esapi.flush_context(primary)
            except TSS2_Exception as e:
                raise _map_error(e, what=what, tcti=tcti_str) from e
        finally:
            esapi.close()
        if handle is None:
            pem = TSSPrivKey(private, public, empty_auth=not secret, parent=TPM2_RH.OWNER).to_pem()
            _write_new_file(path, pem)
        return cls(ref, secret=secret)

    @staticmethod
    def evict(handle: int, *, tcti: str | None = None) -> None:
        """Delete the persistent key at ``handle`` (TPM2_EvictControl with owner auth)."""
        handle = parse_handle(str(handle))
        tcti_str = tcti or default_tcti()
        what = f"persistent handle {handle:#010x}"
        esapi = _connect(tcti_str, what)
        try:
            key_tr = esapi.tr_from_tpmpublic(handle)
            esapi.evict_control(ESYS_TR.OWNER, key_tr, handle)
        except TSS2_Exception as e:
            raise _map_error(e, what=what, tcti=tcti_str) from e
        finally:
            esapi.close()


def _persistent_in_use(esapi: Any, handle: int) -> bool:
    _, data = esapi.get_capability(TPM2_CAP.HANDLES, handle, 1)
    handles = data.data.handles
    return handles.count > 0 and int(handles[0]) == handle


def _write_new_file(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as e:
        raise KeyReferenceError(f"cannot write TPM key blob {str(path)!r}: {e.strerror}") from e


def load_tpm_reference(ref: str, secret: SecretSource | None) -> TpmSigner:
    """Registry loader for ``tpm2:`` references."""
    return TpmSigner(ref, secret=secret)
