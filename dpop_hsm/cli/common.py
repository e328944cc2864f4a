"""What every ``dpop-hsm`` subcommand shares: exit codes, output, secrets, key loading, options.

Nothing here imports more than the standard library and our error tree at module level, so
``dpop-hsm --help`` stays cheap; the helpers import the backends they need when they run.

Secrets never come from argv, where ``ps`` shows them: PINs, key passwords and client secrets
are read from ``env:NAME`` / ``file:PATH`` sources, the environment (``DPOP_HSM_PIN``,
``DPOP_HSM_CLIENT_SECRET``), or a prompt when standard input is a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TextIO

from ..errors import (
    ConfigurationError,
    DPoPError,
    ProtocolError,
    SignerError,
    TokenNotPresentError,
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
    "PromptOnce",
    "UsageError",
    "add_client_options",
    "add_key_options",
    "close_signer",
    "error_parts",
    "exit_code_for",
    "key_info",
    "key_secret",
    "load_key",
    "require_key",
    "reserved_stdout",
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


class PromptOnce:
    """A terminal prompt for a secret that asks once and then answers from memory.

    The token client resolves its secret source on every attempt, and a nonce challenge
    (RFC 9449 §8) means a second attempt within the same renewal: asking the person twice
    would be wrong, and with one line of input the second prompt fails. One instance lives for
    one command, so the secret is asked for once per run. Thread-safe; ``repr`` never shows
    the secret.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._value: str | None = None
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            if self._value is None:
                import getpass

                self._value = getpass.getpass(f"{self.what}: ")
            return self._value

    def __repr__(self) -> str:
        return f"PromptOnce({self.what!r}, asked={self._value is not None})"


def secret_from_options(source: str | None, *, env: str | None, what: str) -> Any:
    """A secret source for the library: explicit ``--*-source``, then env, then a TTY prompt.

    The prompt is a :class:`PromptOnce`: however often the library resolves the source (once
    per token request attempt), the person is asked once per command. Returns None when
    nothing is configured and there is no terminal to ask; the backends then apply their own
    defaults (a ``pin-source`` in the URI, ``DPOP_HSM_PIN``).
    """
    from ..secret_sources import read_secret_source

    if source:
        return read_secret_source(source, what=what)
    if env and env in os.environ:
        return os.environ[env]
    if sys.stdin is not None and sys.stdin.isatty():
        return PromptOnce(what)
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
    """Human text, or exactly one JSON document, on stdout; diagnostics on stderr.

    ``stream`` receives the result. ``log`` is where a command writes human text that is not
    the result (the demo's session log): stdout for people, stderr under ``--json`` so that
    stdout stays one parseable document.
    """

    def __init__(
        self, *, as_json: bool, stream: TextIO | None = None, log: TextIO | None = None
    ) -> None:
        self.as_json = as_json
        self.stream = stream or sys.stdout
        self.log = log or (sys.stderr if as_json else self.stream)
        self.emitted = False

    def emit(self, data: dict[str, Any], text: str) -> None:
        """Write the command's result: ``data`` as JSON under ``--json``, else ``text``."""
        if self.as_json:
            if self.emitted:
                raise RuntimeError("a command emits one JSON document")
            json.dump(data, self.stream, indent=2, sort_keys=False)
            self.stream.write("\n")
        else:
            self.stream.write(text.rstrip("\n") + "\n")
        self.emitted = True
        self.stream.flush()

    def error(self, code: str, message: str, hint: str | None) -> None:
        """Report a failure: ``{"error": {code, message, hint}}`` under ``--json``, else a line
        ``dpop-hsm: error [code]: message (hint)`` on stderr.

        After a JSON result was already written (``serve`` failing once it runs), the error
        goes to stderr only: stdout holds one document.
        """
        if self.as_json and not self.emitted:
            self.emit({"error": {"code": code, "message": message, "hint": hint}}, "")
            return
        line = f"dpop-hsm: error [{code}]: {message}" + (f" ({hint})" if hint else "")
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


# --- keys ------------------------------------------------------------------------------------


def require_key(args: argparse.Namespace) -> str:
    ref: str | None = args.key or os.environ.get(KEY_ENV)
    if not ref:
        raise UsageError(f"no key: give --key REF, set ${KEY_ENV}, or add key to a config profile")
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
        f"(or ${KEY_ENV})",
    )
    p.add_argument(
        "--pin-source",
        metavar="SRC",
        help=f"PIN or key password from env:NAME or file:PATH (or $DPOP_HSM_PIN_SOURCE; "
        f"default: ${PIN_ENV}, the URI's pin-source, or a prompt on a terminal)",
    )


def add_client_options(p: argparse.ArgumentParser) -> None:
    # Defaults are None: each value is resolved flag > environment > config > default
    # (see settings.py), so the parser must not fill them in.
    p.add_argument("--token-endpoint", metavar="URL", help="(or $DPOP_HSM_TOKEN_ENDPOINT)")
    p.add_argument("--client-id", metavar="ID", help="(or $DPOP_HSM_CLIENT_ID)")
    p.add_argument(
        "--auth-method",
        choices=AUTH_METHODS,
        help="client authentication (or $DPOP_HSM_AUTH_METHOD; default client_secret_basic)",
    )
    p.add_argument(
        "--client-secret-source",
        metavar="SRC",
        help=f"client secret from env:NAME or file:PATH (or $DPOP_HSM_CLIENT_SECRET_SOURCE; "
        f"default: ${CLIENT_SECRET_ENV}, or a prompt on a terminal)",
    )
    p.add_argument(
        "--assertion-key",
        metavar="REF",
        help="private_key_jwt: key that signs the client assertion (or "
        "$DPOP_HSM_ASSERTION_KEY; default: the DPoP key)",
    )
    p.add_argument("--scope", help="(or $DPOP_HSM_SCOPE)")
    p.add_argument(
        "--resource",
        action="append",
        metavar="URI",
        help="RFC 8707 resource, repeatable (or $DPOP_HSM_RESOURCE, space-separated)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="seconds per HTTP request (or $DPOP_HSM_TIMEOUT; default 10)",
    )


# --- errors ----------------------------------------------------------------------------------

# The generic advice TokenNotPresentError.diagnostics() appends; right for a smart card that
# is not plugged in, wrong for a module file that does not exist or a TPM that does not answer.
_GENERIC_DEVICE_ADVICE = "is the device plugged in, pcscd running, the slot/token label right?"


def error_parts(error: DPoPError) -> tuple[str, str, str | None]:
    """``(code, message, hint)`` of an error, for one line of text or one JSON document.

    The hint is the error's own ``hint`` when it has one, else what ``diagnostics()`` adds to
    the message; the generic token-not-present advice is replaced where it cannot apply.
    """
    message = error.message
    hint = getattr(error, "hint", None)
    if not isinstance(hint, str) or not hint:
        hint = None
        diagnostics = error.diagnostics()
        if diagnostics != message and diagnostics.startswith(message):
            extra = diagnostics[len(message) :].strip()
            if extra.startswith("(") and extra.endswith(")"):
                extra = extra[1:-1].strip()
            hint = extra or None
    if isinstance(error, TokenNotPresentError) and hint == _GENERIC_DEVICE_ADVICE:
        hint = _token_not_present_hint(message) or hint
    return error.code, message, hint


def _token_not_present_hint(message: str) -> str | None:
    if "PKCS#11 module" in message and "could not be loaded or initialized" in message:
        return (
            "the module file is there but did not initialize: check its own configuration; "
            "SoftHSM2 reads SOFTHSM2_CONF, tpm2-pkcs11 needs TPM2_PKCS11_TCTI and a TPM"
        )
    if "PKCS#11 module" in message and ("does not exist" in message or "not found" in message):
        return (
            "check module-path= or module-name= in the URI, or $DPOP_HSM_PKCS11_MODULE; "
            "'dpop-hsm list' shows the modules it finds"
        )
    if "tokens present:" in message:
        return "check token= against the tokens present; 'dpop-hsm list' prints each token's URI"
    if "TPM" in message or "TCTI" in message:
        return (
            "is the TPM (or swtpm) running and the TCTI right? set tcti= in the reference "
            "or $TPM2TOOLS_TCTI"
        )
    return None


# --- stdout under --json ---------------------------------------------------------------------


@contextlib.contextmanager
def reserved_stdout(as_json: bool) -> Iterator[TextIO]:
    """The stream the result goes to; under ``--json`` nothing else may reach stdout.

    PKCS#11 modules and the TSS print on their own (pkcs11-spy banners, TCTI errors). Under
    ``--json`` file descriptor 1 is pointed at stderr for the duration of the command, and the
    result is written to a duplicate of the original stdout, so stdout carries exactly one
    document. Where stdout is no real file (an embedding program's StringIO), only
    ``sys.stdout`` is redirected.
    """
    if not as_json:
        yield sys.stdout
        return
    real: TextIO = sys.stdout
    # Only the process's own stdout (fd 1) is re-pointed; anything else (an embedding
    # program's StringIO, a test's capture) gets sys.stdout redirected only.
    own = real is sys.__stdout__
    try:
        out_fd = real.fileno() if own else -1
        err_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        out_fd = -1
    if out_fd != 1:
        with contextlib.redirect_stdout(sys.stderr):
            yield real
        return
    real.flush()
    saved = os.dup(out_fd)
    os.dup2(err_fd, out_fd)
    result = os.fdopen(os.dup(saved), "w", encoding="utf-8")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield result
    finally:
        try:
            result.flush()
        finally:
            result.close()
            real.flush()
            os.dup2(saved, out_fd)
            os.close(saved)
