"""What every ``dpop-hsm`` subcommand shares: exit codes, output, secrets, key loading, options.

Nothing here imports more than the standard library and our error tree at module level, so
``dpop-hsm --help`` stays cheap; the helpers import the backends they need when they run.

Secrets never come from argv, where ``ps`` shows them: PINs, key passwords and client secrets
are read from ``env:NAME`` / ``file:PATH`` sources, the environment (``DPOP_HSM_PIN``,
``DPOP_HSM_CLIENT_SECRET``), or a prompt when standard input is a terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from ..errors import (
    ConfigurationError,
    ProtocolError,
    SignerError,
    VerificationError,
)

if TYPE_CHECKING:
    from ..signers.base import Signer

__all__ = [
    "CLIENT_SECRET_ENV",
    "EXIT_CODES",
    "KEY_ENV",
    "PIN_ENV",
    "Output",
    "UsageError",
    "add_client_options",
    "add_key_options",
    "close_signer",
    "exit_code_for",
    "key_info",
    "key_secret",
    "load_key",
    "require_key",
    "secret_from_options",
]

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
AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt", "none")
SECRET_METHODS = ("client_secret_basic", "client_secret_post")


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
    from ..secret_sources import read_secret_source

    if source:
        return read_secret_source(source, what=what)
    if env and env in os.environ:
        return os.environ[env]
    if sys.stdin is not None and sys.stdin.isatty():
        return _prompt(what)
    return None


def key_secret(args: argparse.Namespace) -> Any:
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


# --- keys ------------------------------------------------------------------------------------


def require_key(args: argparse.Namespace) -> str:
    ref: str | None = args.key or os.environ.get(KEY_ENV)
    if not ref:
        raise UsageError(f"no key: give --key REF or set {KEY_ENV}")
    args.key = ref
    return ref


def load_key(args: argparse.Namespace) -> Signer:
    """The signer for ``--key``, with the secret resolved per the rules above."""
    from ..signers import load_signer

    ref = require_key(args)
    return load_signer(ref, secret=key_secret(args))


def key_info(signer: Signer, ref: str) -> dict[str, Any]:
    return {
        "key": getattr(signer, "uri", ref),
        "alg": signer.alg,
        "jwk": dict(signer.public_jwk),
        "jkt": signer.thumbprint,
    }


def close_signer(signer: object) -> None:
    """Close a hardware signer (sessions, TPM connection); software signers have no close."""
    close = getattr(signer, "close", None)
    if callable(close):
        close()


# --- options ---------------------------------------------------------------------------------


def add_key_options(p: argparse.ArgumentParser) -> None:
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


def add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-endpoint", metavar="URL", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--auth-method", choices=AUTH_METHODS, default="client_secret_basic")
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
