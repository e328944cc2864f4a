"""Finding things on a PKCS#11 module: the token, the private key, its public half.

Selection is explicit and never guesses (RFC 7512 §2.3 semantics): every attribute the URI gives
must match, zero matches is :class:`KeyNotFoundError` / :class:`TokenNotPresentError` listing
what *is* there, and several matches is :class:`AmbiguousKeyError` listing every candidate.

The public key is read from the token (``CKA_EC_PARAMS`` + the public object's ``CKA_EC_POINT``,
or ``CKA_MODULUS``/``CKA_PUBLIC_EXPONENT``) and checked by ``cryptography`` when it is built.
Every call into the module goes through the module's gate (see :mod:`.cryptoki`).
"""

from __future__ import annotations

from typing import Any

from asn1crypto import core as asn1
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ..._optional import requires_extra

with requires_extra("pkcs11"):
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11 import exceptions as p11e
    from pkcs11.constants import TokenFlag

from ...errors import AmbiguousKeyError, KeyNotFoundError, TokenNotPresentError, UnsupportedKeyError
from ...jwk import MIN_RSA_BITS, Curve, PublicKey, curve_for_name, curve_for_oid
from .cryptoki import Module
from .uri import Pkcs11Uri

__all__ = [
    "PROTECTION_FLAGS",
    "describe",
    "find_private_key",
    "find_token",
    "public_key_of",
    "read",
]

PROTECTION_FLAGS = (
    ("sensitive", Attribute.SENSITIVE),
    ("always_sensitive", Attribute.ALWAYS_SENSITIVE),
    ("extractable", Attribute.EXTRACTABLE),
    ("never_extractable", Attribute.NEVER_EXTRACTABLE),
    ("local", Attribute.LOCAL),
)


def read(obj: Any, attr: Attribute) -> Any:
    """An attribute, or None when the token will not say (tolerant: tpm2-pkcs11, ykcs11)."""
    try:
        return obj[attr]
    except (p11e.PKCS11Error, KeyError, NotImplementedError):
        return None


def describe(obj: Any) -> str:
    """``label=… id=…`` of an object, for listing candidates (labels and ids are not secret)."""
    label = read(obj, Attribute.LABEL)
    key_id = read(obj, Attribute.ID)
    return f"label={label!r} id={key_id.hex() if isinstance(key_id, bytes) else None}"


def find_token(module: Module, uri: Pkcs11Uri, what: str) -> Any:
    """The one token matching the URI's library, slot and token attributes."""
    lib = module.lib
    for attr, have in (
        ("library_manufacturer", lib.manufacturer_id),
        ("library_description", lib.library_description),
    ):
        want = getattr(uri, attr)
        if want is not None and want != have:
            raise TokenNotPresentError(f"{what}: {attr.replace('_', '-')} is {have!r}")
    if uri.library_version is not None:
        major, _, minor = uri.library_version.partition(".")
        if (int(major), int(minor or 0)) != tuple(lib.library_version):
            raise TokenNotPresentError(f"{what}: library-version does not match")
    try:
        with module.gate.call():
            slots = lib.get_slots(token_present=True)
    except p11e.PKCS11Error as e:
        # ykcs11 without pcscd: DeviceError; with pcscd and no key: an empty list.
        raise TokenNotPresentError(f"{what}: no slots ({type(e).__name__})") from e
    matches: list[Any] = []
    seen: list[str] = []
    for slot in slots:
        if uri.slot_id is not None and slot.slot_id != uri.slot_id:
            continue
        if uri.slot_description is not None and slot.slot_description != uri.slot_description:
            continue
        if uri.slot_manufacturer is not None and slot.manufacturer_id != uri.slot_manufacturer:
            continue
        try:
            with module.gate.call():
                token = slot.get_token()
        except p11e.PKCS11Error:
            continue
        if not token.flags & TokenFlag.TOKEN_INITIALIZED:
            continue  # SoftHSM2's free slot, an empty tpm2-pkcs11 store: no keys to find
        serial = token.serial.decode("ascii", "replace").strip()
        seen.append(f"{token.label!r} (serial {serial})")
        if (
            (uri.token is not None and token.label != uri.token)
            or (uri.serial is not None and serial != uri.serial)
            or (uri.manufacturer is not None and token.manufacturer_id != uri.manufacturer)
            or (uri.model is not None and token.model != uri.model)
        ):
            continue
        matches.append(token)
    if not matches:
        present = ", ".join(seen) if seen else "none"
        raise TokenNotPresentError(
            f"{what}: no token matches {uri.describe_token()} (tokens present: {present})"
        )
    if len(matches) > 1:
        names = ", ".join(
            f"{t.label!r} (serial {t.serial.decode('ascii', 'replace')})" for t in matches
        )
        raise AmbiguousKeyError(
            f"{what}: several tokens match {uri.describe_token()}: {names}; add token= or serial="
        )
    return matches[0]


def find_private_key(
    module: Module, session: Any, token: Any, uri: Pkcs11Uri, *, logged_in: bool
) -> Any:
    """The one private key matching the URI's ``object`` (CKA_LABEL) and ``id`` (CKA_ID)."""
    template: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
    if uri.object is not None:
        template[Attribute.LABEL] = uri.object
    if uri.id is not None:
        template[Attribute.ID] = uri.id
    with module.gate.call():
        found = list(session.get_objects(template))
    if len(found) == 1:
        return found[0]
    what = f"token {token.label!r}"
    if not found:
        with module.gate.call():
            keys = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
            names = "; ".join(describe(k) for k in keys) or "none visible"
        hint = "" if logged_in else " (no PIN given: private keys are hidden)"
        raise KeyNotFoundError(
            f"{what}: no private key matches {uri.describe_key()}; candidates: {names}{hint}"
        )
    with module.gate.call():
        names = "; ".join(describe(k) for k in found)
    raise AmbiguousKeyError(
        f"{what}: {len(found)} private keys match {uri.describe_key()}: {names}; "
        "add object= or id= to the URI"
    )


def _public_object(session: Any, key: Any) -> Any | None:
    template: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PUBLIC_KEY}
    key_id = read(key, Attribute.ID)
    label = read(key, Attribute.LABEL)
    if key_id:
        template[Attribute.ID] = key_id
    elif label:
        template[Attribute.LABEL] = label
    else:
        return None
    found = list(session.get_objects(template))
    if len(found) > 1 and label and Attribute.LABEL not in template:
        found = [o for o in found if read(o, Attribute.LABEL) == label]
    return found[0] if len(found) == 1 else None


def _curve_of(params: bytes) -> Curve:
    """The curve of CKA_EC_PARAMS: a named-curve OID, or (PKCS#11 3.0) a curve name string."""
    try:
        value = asn1.Asn1Value.load(params, strict=True)
    except (ValueError, TypeError) as e:
        raise UnsupportedKeyError("CKA_EC_PARAMS is not DER") from e
    if isinstance(value, asn1.ObjectIdentifier):
        return curve_for_oid(value.dotted)
    if isinstance(value, asn1.PrintableString):
        found = curve_for_name(str(value.native))
        if found is not None:
            return found
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


def public_key_of(module: Module, session: Any, key: Any) -> tuple[str, PublicKey]:
    """(JWK crv or 'RSA', public key) of a private key object, read from the token."""
    with module.gate.call():
        key_type = read(key, Attribute.KEY_TYPE)
        what = f"key {describe(key)}"
        public = _public_object(session, key)
        if key_type in (KeyType.EC, KeyType.EC_EDWARDS):
            params = read(key, Attribute.EC_PARAMS) or (
                read(public, Attribute.EC_PARAMS) if public is not None else None
            )
            point = read(public, Attribute.EC_POINT) if public is not None else None
        elif key_type == KeyType.RSA:
            n = read(key, Attribute.MODULUS) or (
                read(public, Attribute.MODULUS) if public is not None else None
            )
            e = read(key, Attribute.PUBLIC_EXPONENT) or (
                read(public, Attribute.PUBLIC_EXPONENT) if public is not None else None
            )
        else:
            raise UnsupportedKeyError(f"{what}: key type {key_type!r} is not usable for DPoP")
    if key_type == KeyType.RSA:
        if not n or not e:
            raise UnsupportedKeyError(f"{what}: the token does not reveal the RSA modulus")
        pub = rsa.RSAPublicNumbers(int.from_bytes(e, "big"), int.from_bytes(n, "big")).public_key()
        if pub.key_size < MIN_RSA_BITS:
            raise UnsupportedKeyError(f"{what}: RSA key has {pub.key_size} bits (< 2048)")
        return "RSA", pub
    if not params:
        raise UnsupportedKeyError(f"{what}: the token does not reveal CKA_EC_PARAMS")
    found = _curve_of(params)
    if point is None:
        raise UnsupportedKeyError(f"{what}: no public key object with the same id or label")
    try:
        if found.kty == "OKP":
            if key_type != KeyType.EC_EDWARDS:
                raise UnsupportedKeyError(f"{what}: Ed25519 parameters on a non-EdDSA key")
            raw = _unwrap_point(point, found.size)
            return found.crv, ed25519.Ed25519PublicKey.from_public_bytes(raw)
        raw_point = _unwrap_point(point, 1 + 2 * found.size)  # uncompressed: 04 || X || Y
        key_obj = ec.EllipticCurvePublicKey.from_encoded_point(found.ec_curve(), raw_point)
        return found.crv, key_obj
    except ValueError as err:
        raise UnsupportedKeyError(f"{what}: CKA_EC_POINT is not a point on {found.crv}") from err
