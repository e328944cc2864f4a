"""The ``dpop-hsm`` command: key management, proofs, tokens and DPoP requests from a shell.

Layout, one way only (each module imports those below it, never above):

* :mod:`~dpop_hsm.cli.common` — exit codes, output, secrets, key loading, shared options;
* :mod:`~dpop_hsm.cli.keys` — ``keygen``, ``jwk``, ``thumbprint``, ``proof``;
* :mod:`~dpop_hsm.cli.net` — ``token``, ``request``, ``serve``;
* :mod:`~dpop_hsm.cli.demo` — ``demo`` (uses the local servers of ``net``);
* this module — the parser and :func:`main`.

Start-up stays cheap: only argparse and our error tree load before a subcommand runs; each
subcommand imports what it needs (``dpop-hsm --help`` loads no hardware backend and no httpx).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from ..errors import DPoPError
from . import demo, keys, net
from .common import (
    CLIENT_SECRET_ENV,
    EXIT_CODES,
    EXIT_CONFIG,
    EXIT_HARDWARE,
    EXIT_OK,
    EXIT_SERVER,
    EXIT_UNEXPECTED,
    EXIT_USAGE,
    EXIT_VERIFY,
    KEY_ENV,
    PIN_ENV,
    Output,
    UsageError,
    exit_code_for,
    load_key,
    secret_from_options,
)

__all__ = [
    "CLIENT_SECRET_ENV",
    "EXIT_CODES",
    "EXIT_CONFIG",
    "EXIT_HARDWARE",
    "EXIT_OK",
    "EXIT_SERVER",
    "EXIT_UNEXPECTED",
    "EXIT_USAGE",
    "EXIT_VERIFY",
    "KEY_ENV",
    "PIN_ENV",
    "Output",
    "UsageError",
    "build_parser",
    "exit_code_for",
    "load_key",
    "main",
    "secret_from_options",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpop-hsm",
        description="OAuth 2.0 DPoP (RFC 9449) with keys in PKCS#11 tokens, TPMs or files.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="masked HTTP session log")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    keys.register(sub)
    net.register(sub)
    demo.register(sub)
    return parser


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
