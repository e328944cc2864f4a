"""Key pairs made inside a PKCS#11 token: sensitive, never extractable, sign-only.

The private key is TOKEN, PRIVATE, SENSITIVE, non-EXTRACTABLE and SIGN-only (the token then
reports it ALWAYS_SENSITIVE, NEVER_EXTRACTABLE and LOCAL); the public key is VERIFY-only.
Label and id come from the URI's ``object`` and ``id`` (a random 16-byte id when absent), and an
existing object with that label or id is never overwritten. Templates avoid attributes
tpm2-pkcs11 rejects, and the keygen is retried once without the explicit "no decrypt, unwrap,
derive" flags if the token refuses the strict template.
"""

from __future__ import annotations

import secrets
from typing import Any

from asn1crypto import core as asn1

from ..._optional import requires_extra

with requires_extra("pkcs11"):
    from pkcs11 import Attribute, KeyType, Mechanism
    from pkcs11 import exceptions as p11e
    from pkcs11.constants import DEFAULT as P11_DEFAULT

from ...algorithms import AlgorithmInfo
from ...errors import KeyReferenceError, MechanismNotSupportedError
from ...jwk import curve
from .ckr import TEMPLATE, error_for_exception, has_fault
from .cryptoki import Module
from .objects import describe, find_token
from .uri import Pkcs11Uri

__all__ = ["generate_key_pair"]


def generate_key_pair(
    module: Module, uri: Pkcs11Uri, info: AlgorithmInfo, *, pin: str | None
) -> Pkcs11Uri:
    """Create the pair on the token the URI names; return the URI of the new private key.

    Raises KeyReferenceError (label or id taken), MechanismNotSupportedError (the token cannot
    generate this alg), and the mapped token errors (TokenNotPresentError, PinError, …).
    """
    key_id = uri.id if uri.id else secrets.token_bytes(16)
    label = uri.object if uri.object else f"dpop-{key_id.hex()[:12]}"
    target = uri.replace(object=label, id=key_id, type=None)
    token = find_token(module, target, f"PKCS#11 module {module.path!r}")
    session = module.open_session(token, pin=pin, rw=True)
    what = f"token {token.label!r}"
    try:
        with module.gate.call():
            clash = [
                o
                for t in ({Attribute.LABEL: label}, {Attribute.ID: key_id})
                for o in session.get_objects(t)
            ]
            names = "; ".join(sorted({describe(o) for o in clash}))
        if clash:
            raise KeyReferenceError(
                f"{what}: objects with label {label!r} or id {key_id.hex()} already exist "
                f"({names}); refusing to overwrite"
            )
        try:
            with module.gate.call():
                mechanisms = set(token.slot.get_mechanisms())
        except p11e.PKCS11Error as e:
            raise error_for_exception(e, what) from e
        _generate_pair(session, info, label, key_id, mechanisms, what, module)
    finally:
        module.close_session(session)
    return target


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
        public[Attribute.EC_PARAMS] = asn1.ObjectIdentifier(curve(info.crv).oid).dump()
    elif info.kty == "OKP":
        key_type, mech, length = KeyType.EC_EDWARDS, Mechanism.EC_EDWARDS_KEY_PAIR_GEN, None
        public[Attribute.EC_PARAMS] = asn1.ObjectIdentifier(curve(info.crv).oid).dump()
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
        except p11e.PKCS11Error as e:
            if not strict or not has_fault(e, TEMPLATE):
                raise error_for_exception(e, f"{what}: generate {info.name}") from e
