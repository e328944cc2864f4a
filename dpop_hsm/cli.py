"""The ``dpop-hsm`` command: key management, proofs, tokens and DPoP requests from a shell.

Start-up stays cheap: only argparse and our error tree load before a subcommand runs; each
subcommand imports what it needs (``dpop-hsm --help`` loads no hardware backend and no httpx).

Secrets never come from argv, where ``ps`` shows them: PINs, key passwords and client secrets
are read from ``env:NAME`` / ``file:PATH`` sources, the environment (``DPOP_HSM_PIN``,
``DPOP_HSM_CLIENT_SECRET``), or a prompt when standard input is a terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from .errors import (
    ConfigurationError,
    DPoPError,
    ProtocolError,
    SignerError,
    VerificationError,
)

if TYPE_CHECKING:
    from .signers.base import Signer

__all__ = ["EXIT_CODES", "main"]

# Distinct exit codes so scripts can tell whose fault a failure was.
EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2  # argparse's own code for bad arguments
EXIT_CONFIG = 3
EXIT_HARDWARE = 4
EXIT_SERVER = 5
EXIT_VERIFY = 6
EXIT_CODES = {
    "ok": EXIT_OK,
    "unexpected": EXIT_UNEXPECTED,
    "usage": EXIT_USAGE,
    "configuration": EXIT_CONFIG,
    "hardware": EXIT_HARDWARE,
    "server": EXIT_SERVER,
    "verification": EXIT_VERIFY,
}

PIN_ENV = "DPOP_HSM_PIN"
CLIENT_SECRET_ENV = "DPOP_HSM_CLIENT_SECRET"  # noqa: S105 - a variable name, not a secret
KEY_ENV = "DPOP_HSM_KEY"


class UsageError(ConfigurationError):
    """Arguments that parse but do not make sense together."""

    code = "usage"


def exit_code_for(error: BaseException) -> int:
    """Map an error family to its exit code."""
    if isinstance(error, UsageError):
        return EXIT_USAGE
    if isinstance(error, ConfigurationError):
        return EXIT_CONFIG
    if isinstance(error, SignerError):
        return EXIT_HARDWARE
    if isinstance(error, ProtocolError):
        return EXIT_SERVER
    if isinstance(error, VerificationError):
        return EXIT_VERIFY
    return EXIT_UNEXPECTED


# --- secrets ---------------------------------------------------------------------------------


def _prompt(what: str) -> Callable[[], str]:
    def ask() -> str:
        import getpass

        return getpass.getpass(f"{what}: ")

    return ask


def secret_from_options(source: str | None, *, env: str | None, what: str) -> Any:
    """A secret source for the library: explicit ``--*-source``, then env, then a TTY prompt.

    Returns None when nothing is configured and there is no terminal to ask; the backends then
    apply their own defaults (a ``pin-source`` in the URI, ``DPOP_HSM_PIN``).
    """
    from .secret_sources import read_secret_source

    if source:
        return read_secret_source(source, what=what)
    if env and env in os.environ:
        return os.environ[env]
    if sys.stdin is not None and sys.stdin.isatty():
        return _prompt(what)
    return None


def _key_secret(args: argparse.Namespace) -> Any:
    """PIN / password for ``--key``: prompt only when the reference names no source itself."""
    ref = args.key or ""
    if args.pin_source:
        return secret_from_options(args.pin_source, env=None, what="PIN or key password")
    if PIN_ENV in os.environ or "pin-source=" in ref or "pin-value=" in ref:
        return None  # the backend resolves it
    if ref.startswith(("pkcs11:", "tpm2:")):
        return secret_from_options(None, env=None, what="PIN")
    return None  # software keys: prompted lazily by the loader only when encrypted


# --- output ----------------------------------------------------------------------------------


class Output:
    """Human text or one JSON document on stdout; diagnostics on stderr."""

    def __init__(self, *, as_json: bool, stream: TextIO | None = None) -> None:
        self.as_json = as_json
        self.stream = stream or sys.stdout

    def emit(self, data: dict[str, Any], text: str) -> None:
        if self.as_json:
            json.dump(data, self.stream, indent=2, sort_keys=False)
            self.stream.write("\n")
        else:
            self.stream.write(text.rstrip("\n") + "\n")
        self.stream.flush()


# --- key commands ----------------------------------------------------------------------------


def _require_key(args: argparse.Namespace) -> str:
    ref: str | None = args.key or os.environ.get(KEY_ENV)
    if not ref:
        raise UsageError(f"no key: give --key REF or set {KEY_ENV}")
    args.key = ref
    return ref


def load_key(args: argparse.Namespace) -> Signer:
    """The signer for ``--key``, with the secret resolved per the rules above."""
    from .signers import load_signer

    ref = _require_key(args)
    return load_signer(ref, secret=_key_secret(args))


def _key_info(signer: Signer, ref: str) -> dict[str, Any]:
    return {
        "key": getattr(signer, "uri", ref),
        "alg": signer.alg,
        "jwk": dict(signer.public_jwk),
        "jkt": signer.thumbprint,
    }


def cmd_keygen(args: argparse.Namespace, out: Output) -> int:
    ref = _require_key(args)
    signer: Signer
    if ref.startswith("pkcs11:"):
        from .signers.pkcs11 import Pkcs11Signer

        signer = Pkcs11Signer.generate(ref, alg=args.alg, secret=_key_secret(args))
    elif ref.startswith("tpm2:"):
        signer = _keygen_tpm(ref, args)
    else:
        signer = _keygen_file(ref, args)
    info = _key_info(signer, ref)
    close = getattr(signer, "close", None)
    if callable(close):
        close()
    out.emit(
        info,
        f"key:  {info['key']}\nalg:  {info['alg']}\njkt:  {info['jkt']}\n"
        f"jwk:  {json.dumps(info['jwk'])}",
    )
    return EXIT_OK


def _keygen_tpm(ref: str, args: argparse.Namespace) -> Signer:
    from .signers.tpm import TpmSigner
    from .signers.tpm_ref import TpmReference

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

    from .signers.software import SoftwareSigner

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
    jwk = dict(signer.public_jwk)
    out.emit({"jwk": jwk, "alg": signer.alg, "jkt": signer.thumbprint}, json.dumps(jwk))
    return EXIT_OK


def cmd_thumbprint(args: argparse.Namespace, out: Output) -> int:
    signer = load_key(args)
    out.emit({"jkt": signer.thumbprint}, signer.thumbprint)
    return EXIT_OK


def _read_token_file(path: str | None) -> str | None:
    if path is None:
        return None
    from .secret_sources import read_secret_source

    return read_secret_source("file:" + path, what="access token file").strip()


def cmd_proof(args: argparse.Namespace, out: Output) -> int:
    from .proof import ProofFactory

    signer = load_key(args)
    proof = ProofFactory(signer).create(
        args.method.upper(),
        args.url,
        access_token=_read_token_file(args.access_token_file),
        nonce=args.nonce,
    )
    # A proof is printed only because it was asked for: it is single-use and short-lived.
    out.emit({"proof": proof, "jkt": signer.thumbprint}, proof)
    return EXIT_OK


# --- parser ----------------------------------------------------------------------------------


def _add_key_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--key",
        metavar="REF",
        help=f"key reference: a PEM/DER/JWK path, a pkcs11: URI or a tpm2: reference "
        f"(default: ${KEY_ENV})",
    )
    p.add_argument(
        "--pin-source",
        metavar="SRC",
        help=f"PIN or key password from env:NAME or file:PATH (default: ${PIN_ENV}, "
        "the URI's pin-source, or a prompt on a terminal)",
    )


def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-endpoint", metavar="URL", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument(
        "--auth-method",
        choices=["client_secret_basic", "client_secret_post", "private_key_jwt", "none"],
        default="client_secret_basic",
    )
    p.add_argument(
        "--client-secret-source",
        metavar="SRC",
        help=f"client secret from env:NAME or file:PATH (default: ${CLIENT_SECRET_ENV}, "
        "or a prompt on a terminal)",
    )
    p.add_argument(
        "--assertion-key",
        metavar="REF",
        help="private_key_jwt: key that signs the client assertion (default: the DPoP key)",
    )
    p.add_argument("--scope")
    p.add_argument("--resource", action="append", help="RFC 8707 resource (repeatable)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpop-hsm",
        description="OAuth 2.0 DPoP (RFC 9449) with keys in PKCS#11 tokens, TPMs or files.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="masked HTTP session log")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("keygen", help="create a key in a token/TPM or a key file")
    _add_key_options(p)
    p.add_argument("--alg", default="ES256", help="ES256 (default), ES384, ES512, EdDSA, PS256")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("jwk", help="print the public JWK")
    _add_key_options(p)
    p.set_defaults(func=cmd_jwk)

    p = sub.add_parser("thumbprint", help="print the RFC 7638 thumbprint (jkt)")
    _add_key_options(p)
    p.set_defaults(func=cmd_thumbprint)

    p = sub.add_parser("proof", help="print one DPoP proof")
    _add_key_options(p)
    p.add_argument("-X", "--method", default="GET")
    p.add_argument("--access-token-file", metavar="FILE", help="adds ath for this token")
    p.add_argument("--nonce")
    p.add_argument("url")
    p.set_defaults(func=cmd_proof)

    _add_network_commands(sub)
    return parser


def _add_network_commands(sub: Any) -> None:
    from . import cli_net

    cli_net.add_commands(sub, _add_key_options, _add_client_options)


# --- main ------------------------------------------------------------------------------------


def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("dpop_hsm")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logger.propagate = False


def fail(message: str, code: int) -> NoReturn:
    sys.stderr.write(f"dpop-hsm: error: {message}\n")
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dpop-hsm``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    out = Output(as_json=args.json)
    try:
        code: int = args.func(args, out)
        return code
    except DPoPError as e:
        if args.verbose:
            traceback.print_exc(file=sys.stderr)
        sys.stderr.write(f"dpop-hsm: error [{e.code}]: {e.diagnostics()}\n")
        return exit_code_for(e)
    except KeyboardInterrupt:
        sys.stderr.write("dpop-hsm: interrupted\n")
        return 130
    except BrokenPipeError:
        return EXIT_OK
