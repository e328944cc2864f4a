"""Entry points the tests run in a child process (``python -c "from tests.support.children
import X; X()"``), with their job as JSON on stdin so no PIN is ever an argument.

A child, not the test process, because what they do must not happen inside pytest: SoftHSM2 sees
only tokens that exist when it is initialized (a token re-created under a live signer is created
outside, as a re-inserted token would be), and tpm2-pkcs11 reads its store when loaded (loading
it in the test process would hide keys that later tests add with ``tpm2_ptool``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def command(entry: str) -> list[str]:
    """argv that runs ``entry`` (a function of this module) in a fresh interpreter.

    The child must run with the repository root as its working directory (or on PYTHONPATH).
    """
    assert entry in ("softhsm_admin", "tpm2_pkcs11_admin"), entry
    return [sys.executable, "-c", f"from tests.support.children import {entry}; {entry}()"]


def softhsm_admin() -> None:
    """Initialize SoftHSM2 tokens and/or import one EC key, as the JSON job on stdin asks.

    Job: ``{"module", "pin", "so_pin", "init": [labels], "import": {"token", "pem", "label",
    "id"}}``; the key becomes a sensitive private object plus its public object (same id).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from pkcs11 import Attribute
    from pkcs11.util.ec import decode_ec_private_key, decode_ec_public_key

    from dpop_hsm.signers.pkcs11_admin import init_token
    from dpop_hsm.signers.pkcs11_module import load_module

    request = json.loads(sys.stdin.read())
    module = request["module"]
    for label in request.get("init", ()):
        init_token(module, label=label, so_pin=request["so_pin"], user_pin=request["pin"])
    job = request.get("import")
    if job is None:
        return
    key = serialization.load_pem_private_key(Path(job["pem"]).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    private = decode_ec_private_key(
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public = decode_ec_public_key(
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    common = {
        Attribute.TOKEN: True,
        Attribute.LABEL: job["label"],
        Attribute.ID: bytes.fromhex(job["id"]),
    }
    private.update(common)
    private.update({Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.SIGN: True})
    public.update(common)
    public[Attribute.VERIFY] = True
    token = load_module(module).lib.get_token(token_label=job["token"])
    with token.open(rw=True, user_pin=request["pin"]) as session:
        session.create_object(private)
        session.create_object(public)


def tpm2_pkcs11_admin() -> None:
    """On tpm2-pkcs11: init a token, make a key, sign and verify, try a wrong PIN.

    Job: ``{"module", "label", "so_pin", "user_pin"}``. Prints one JSON line: the module's token
    labels, whether the signature verified, and the wrong PIN's error class name (suffixed with
    ``": leaks"`` if its message contained the PIN).
    """
    from dpop_hsm.errors import PinError
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer
    from dpop_hsm.signers.pkcs11_admin import init_token, token_labels
    from tests.support.verifier import verify_signature

    job = json.loads(sys.stdin.read())
    module, label, user_pin = job["module"], job["label"], job["user_pin"]
    init_token(module, label=label, so_pin=job["so_pin"], user_pin=user_pin)
    uri = f"pkcs11:token={label};object=k?module-path={module}"
    with Pkcs11Signer.generate(uri, "ES256", secret=user_pin) as signer:
        verify_signature(signer.public_jwk, b"payload", signer.sign(b"payload"))
    try:
        Pkcs11Signer(uri, secret="not-" + user_pin)
        wrong = "accepted"
    except PinError as e:
        wrong = type(e).__name__ + (": leaks" if user_pin in str(e) else "")
    print(json.dumps({"labels": token_labels(module), "verified": True, "wrong_pin": wrong}))
