"""The key subcommands of ``dpop-hsm``: ``keygen``, ``jwk``, ``thumbprint``, ``proof`` and
``verify`` (the server side of ``proof``).

Each loads only the backend its ``--key`` names, when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from .common import (
    EXIT_OK,
    Output,
    UsageError,
    add_key_options,
    close_signer,
    key_info,
    key_secret,
    load_key,
    require_key,
    secret_from_options,
)
from .settings import KEY_SETTINGS

if TYPE_CHECKING:
    from ..signers.base import Signer

__all__ = ["cmd_jwk", "cmd_keygen", "cmd_proof", "cmd_thumbprint", "cmd_verify", "register"]


def cmd_keygen(args: argparse.Namespace, out: Output) -> int:
    ref = require_key(args)
    signer: Signer
    # Dispatch on the reference's scheme; the signer registry is the one place that will
    # map a scheme to its backend's key generation.
    if ref.startswith("pkcs11:"):
        from ..signers.pkcs11 import Pkcs11Signer

        signer = Pkcs11Signer.generate(ref, alg=args.alg, secret=key_secret(args))
    elif ref.startswith("tpm2:"):
        signer = _keygen_tpm(ref, args)
    else:
        signer = _keygen_file(ref, args)
    info = key_info(signer, ref)
    close_signer(signer)
    out.emit(
        info,
        f"key:  {info['key']}\nalg:  {info['alg']}\njkt:  {info['jkt']}\n"
        f"jwk:  {json.dumps(info['jwk'])}",
    )
    return EXIT_OK


def _keygen_tpm(ref: str, args: argparse.Namespace) -> Signer:
    from ..signers.tpm import TpmSigner
    from ..signers.tpm_ref import TpmReference

    parsed = TpmReference.parse(ref)
    auth = None
    if parsed.auth_source:
        auth = secret_from_options(parsed.auth_source, env=None, what="TPM key auth value")
    elif args.pin_source:
        auth = secret_from_options(args.pin_source, env=None, what="TPM key auth value")
    return TpmSigner.generate(
        tcti=parsed.tcti,
        handle=parsed.handle,
        blob_path=parsed.blob,
        alg=parsed.alg or args.alg,
        auth=auth,
    )


def _keygen_file(ref: str, args: argparse.Namespace) -> Signer:
    from pathlib import Path

    from ..signers.software import SoftwareSigner

    path = Path(ref[5:] if ref.startswith("file:") else ref)
    if path.exists():
        raise ConfigurationError(f"{str(path)!r} exists; refusing to overwrite a key file")
    password = None
    if args.pin_source:
        password = secret_from_options(args.pin_source, env=None, what="key password")
    signer = SoftwareSigner.generate(args.alg or "ES256")
    pem = signer.private_pem(password if isinstance(password, str) else None)
    try:
        # O_EXCL: never clobber a key created meanwhile; 0600: the key is a secret.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise ConfigurationError(f"cannot create {str(path)!r}: {e.strerror}") from e
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return signer


def cmd_jwk(args: argparse.Namespace, out: Output) -> int:
    signer = load_key(args)
    try:
        jwk = dict(signer.public_jwk)
        out.emit({"jwk": jwk, "alg": signer.alg, "jkt": signer.thumbprint}, json.dumps(jwk))
    finally:
        close_signer(signer)
    return EXIT_OK


def cmd_thumbprint(args: argparse.Namespace, out: Output) -> int:
    signer = load_key(args)
    try:
        out.emit({"jkt": signer.thumbprint}, signer.thumbprint)
    finally:
        close_signer(signer)
    return EXIT_OK


def read_token_file(path: str | None) -> str | None:
    """An access token from a file (never from argv: ``ps`` would show it)."""
    if path is None:
        return None
    from ..secret_sources import read_secret_source

    return read_secret_source("file:" + path, what="access token file").strip()


def cmd_proof(args: argparse.Namespace, out: Output) -> int:
    from ..proof import ProofFactory

    signer = load_key(args)
    try:
        proof = ProofFactory(signer).create(
            args.method.upper(),
            args.url,
            access_token=read_token_file(args.access_token_file),
            nonce=args.nonce,
        )
        # A proof is printed only because it was asked for: it is single-use and short-lived.
        out.emit({"proof": proof, "jkt": signer.thumbprint}, proof)
    finally:
        close_signer(signer)
    return EXIT_OK


_MAX_PROOF_INPUT = 64 * 1024


def _read_proof(path: str | None) -> str:
    """The proof to check, from a file or piped on stdin — never argv, where ``ps`` shows it."""
    if path in (None, "-"):
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("no proof: give --proof-file FILE, or pipe the proof on stdin")
        raw = sys.stdin.buffer.read(_MAX_PROOF_INPUT)
    else:
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_PROOF_INPUT)
        except OSError as e:
            raise ConfigurationError(f"cannot read {path!r}: {e.strerror}") from e
    # Undecodable bytes become U+FFFD, which verify_proof rejects as non-ASCII (a check).
    text = raw.decode("utf-8", "replace")
    proof = text.strip()
    if not proof:
        raise UsageError("no proof: the input is empty")
    return proof


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    """Check a DPoP proof as a server would (RFC 9449 §4.3); a failed check exits with 6."""
    from ..verify import DEFAULT_ALGORITHMS, verify_proof

    proof = _read_proof(args.proof_file)
    verified = verify_proof(
        proof,
        htm=args.method.upper(),
        htu=args.url,
        access_token=read_token_file(args.access_token_file),
        nonce=args.nonce,
        expected_jkt=args.jkt,
        algorithms=frozenset(args.alg) if args.alg else DEFAULT_ALGORITHMS,
        max_age=args.max_age,
    )
    claims = dict(verified.claims)
    data = {
        "valid": True,
        "jkt": verified.jkt,
        "alg": verified.header.get("alg"),
        "claims": claims,
    }
    text = (
        f"valid DPoP proof: {claims.get('htm')} {claims.get('htu')}\n"
        f"jkt: {verified.jkt}\nalg: {data['alg']}\n"
        f"iat: {claims.get('iat')}  jti: {claims.get('jti')}"
    )
    out.emit(data, text)
    return EXIT_OK


def register(sub: Any) -> None:
    """Add the key subcommands to the main parser's subparsers."""
    p = sub.add_parser("keygen", help="create a key in a token/TPM or a key file")
    add_key_options(p)
    p.add_argument("--alg", default="ES256", help="ES256 (default), ES384, ES512, EdDSA, PS256")
    p.set_defaults(func=cmd_keygen, settings=KEY_SETTINGS)

    p = sub.add_parser("jwk", help="print the public JWK")
    add_key_options(p)
    p.set_defaults(func=cmd_jwk, settings=KEY_SETTINGS)

    p = sub.add_parser("thumbprint", help="print the RFC 7638 thumbprint (jkt)")
    add_key_options(p)
    p.set_defaults(func=cmd_thumbprint, settings=KEY_SETTINGS)

    p = sub.add_parser("proof", help="print one DPoP proof")
    add_key_options(p)
    p.add_argument("-X", "--method", default="GET")
    p.add_argument("--access-token-file", metavar="FILE", help="adds ath for this token")
    p.add_argument("--nonce")
    p.add_argument("url")
    p.set_defaults(func=cmd_proof, settings=KEY_SETTINGS)

    p = sub.add_parser(
        "verify",
        help="check a DPoP proof against a method and URL (exit 6 when a check fails)",
        description="Verifies a proof as a resource server would (RFC 9449 §4.3): signature, "
        "typ, alg, jwk, htm, htu, iat, jti, and ath/nonce/jkt when given.",
    )
    p.add_argument("-X", "--method", default="GET")
    p.add_argument(
        "--proof-file", metavar="FILE", help="the proof (default: read from stdin; '-' too)"
    )
    p.add_argument("--access-token-file", metavar="FILE", help="require ath for this token")
    p.add_argument("--nonce", help="require this nonce")
    p.add_argument("--jkt", help="require this key thumbprint (the token's cnf.jkt)")
    p.add_argument(
        "--alg", action="append", metavar="ALG", help="allowed alg, repeatable (default: all)"
    )
    p.add_argument(
        "--max-age", type=float, default=60.0, metavar="S", help="oldest iat accepted (60 s)"
    )
    p.add_argument("url")
    p.set_defaults(func=cmd_verify)
