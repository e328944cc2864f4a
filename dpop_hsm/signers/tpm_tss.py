"""TPM 2.0 plumbing for :mod:`dpop_hsm.signers.tpm`: templates, connection, errors, key areas.

The TPM side of our Signer contract, kept apart from the signer's locking and retry logic:
the storage-primary and signing-key templates, the one TSS return code → error mapping, and the
check that a key's public area is a DPoP signing key (its JWK comes from the one curve table in
:mod:`dpop_hsm.jwk`). Importing it imports tpm2-pytss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from ..algorithms import algorithm
from ..errors import (
    DeviceError,
    KeyNotFoundError,
    KeyReferenceError,
    MechanismNotSupportedError,
    MissingDependencyError,
    PinError,
    PinLockedError,
    SignerError,
    TpmUnreachableError,
    UnsupportedKeyError,
)
from ..jwk import Curve, jwk_from_public_key
from ..jwk import curve as jwk_curve

os.environ.setdefault(
    "TSS2_LOG", "all+NONE"
)  # before the TSS can log anything (see the tpm module docstring)

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

__all__ = [  # with the tpm2-pytss names tpm.py uses, so it imports them after TSS2_LOG is set
    "CURVES",
    "ESYS_TR",
    "TPM2B_AUTH",
    "TPM2B_SENSITIVE_CREATE",
    "TPM2_RC",
    "TPM2_RH",
    "TPM2_ST",
    "TPMS_SENSITIVE_CREATE",
    "TPMT_TK_HASHCHECK",
    "TSS2_Exception",
    "TSSPrivKey",
    "TpmCurve",
    "connect",
    "ecc_curve_ids",
    "is_link_error",
    "key_template",
    "map_error",
    "persistent_in_use",
    "primary_template",
    "public_of",
    "read_blob",
    "sig_scheme",
    "write_new_file",
]

_MAX_BLOB = 64 * 1024


@dataclass(frozen=True)
class TpmCurve:
    """A curve as the TPM names it, joined to the one curve table (dpop_hsm.jwk)."""

    alg: str
    tpm_curve: int
    hash_alg: int
    hash_name: str
    size: int
    curve: Curve


def _tpm_curve(crv: str, tpm_curve: int) -> TpmCurve:
    c = jwk_curve(crv)
    hash_name = algorithm(c.alg).hash_name or "sha256"
    tpm_hash = {"sha256": TPM2_ALG.SHA256, "sha384": TPM2_ALG.SHA384}[hash_name]
    return TpmCurve(c.alg, tpm_curve, tpm_hash, hash_name, c.size, c)


# TPM 2.0 Part 2 §6.4 TPM_ECC_CURVE: the curves a TPM can hold that JWS signs with.
CURVES: dict[str, TpmCurve] = {
    c.alg: c
    for c in (_tpm_curve("P-256", TPM2_ECC.NIST_P256), _tpm_curve("P-384", TPM2_ECC.NIST_P384))
}
_BY_TPM_CURVE = {int(c.tpm_curve): c for c in CURVES.values()}

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


def primary_template() -> Any:
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


def key_template(curve: TpmCurve) -> Any:
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


def sig_scheme(curve: TpmCurve) -> Any:
    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
    scheme.details.any.hashAlg = curve.hash_alg
    return scheme


def is_link_error(e: TSS2_Exception) -> bool:
    """True when the TPM did not answer (connection lost), as opposed to answering 'no'."""
    return (int(e.rc) & _LAYER_MASK) == _TCTI_LAYER or int(e.rc) == int(TPM2_RC.INITIALIZE)


def map_error(e: TSS2_Exception, *, what: str, tcti: str) -> SignerError:
    """A TSS return code → our typed error. ``str(e)`` is the TSS's decoding of the code only."""
    rc = int(e.rc)
    if is_link_error(e):
        return TpmUnreachableError(f"{what}: no TPM answers at TCTI {tcti!r} ({e})")
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


def connect(tcti: str, what: str) -> Any:
    try:
        return ESAPI(tcti)
    except TSS2_Exception as e:
        raise map_error(e, what=what, tcti=tcti) from e


def ecc_curve_ids(esapi: Any) -> set[int]:
    _, data = esapi.get_capability(TPM2_CAP.ECC_CURVES, 0, 64)
    curves = data.data.eccCurves  # index by count: tpm2-pytss 3.0 fails iterating empty TPMLs
    return {int(curves[i]) for i in range(curves.count)}


def public_of(public: Any, *, what: str) -> tuple[TpmCurve, dict[str, str]]:
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
        point = ec.EllipticCurvePublicNumbers(x, y, curve.curve.ec_curve()).public_key()
    except ValueError as e:
        raise UnsupportedKeyError(f"{what}: public point is not on the curve") from e
    return curve, jwk_from_public_key(point)  # coordinates left-padded to full length


def read_blob(path: Path) -> Any:
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


def persistent_in_use(esapi: Any, handle: int) -> bool:
    _, data = esapi.get_capability(TPM2_CAP.HANDLES, handle, 1)
    handles = data.data.handles
    return handles.count > 0 and int(handles[0]) == handle


def write_new_file(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as e:
        raise KeyReferenceError(f"cannot write TPM key blob {str(path)!r}: {e.strerror}") from e
