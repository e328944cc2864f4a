"""The ``dpop-hsm`` command: key management, proofs, tokens and DPoP requests from a shell.

Layout, one way only (each module imports those below it, never above):

* :mod:`~dpop_hsm.cli.common` — exit codes, output, secrets, key loading, shared options;
* :mod:`~dpop_hsm.cli.keys` — ``keygen``, ``jwk``, ``thumbprint``, ``proof``;
* :mod:`~dpop_hsm.cli.login` — ``login``, ``logout`` and the login profiles of ``--profile``;
* :mod:`~dpop_hsm.cli.net` — ``token``, ``request``, ``serve``;
* :mod:`~dpop_hsm.cli.demo` — ``demo`` (uses the local servers of ``net``);
* :mod:`~dpop_hsm.cli.listing` — ``list``: modules, tokens, keys and TPM handles;
* :mod:`~dpop_hsm.cli.settings` — flag > environment > config profile > default;
* this module — the parser and :func:`main`.

Start-up stays cheap: only argparse and our error tree load before a subcommand runs; each
subcommand imports what it needs (``dpop-hsm --help`` loads no hardware backend and no httpx).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ..errors import DPoPError
from . import demo, keys, listing, login, net
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
    error_parts,
    exit_code_for,
    load_key,
    reserved_stdout,
    secret_from_options,
)
from .settings import resolve_settings

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
    "ArgumentsError",
    "Output",
    "UsageError",
    "build_parser",
    "exit_code_for",
    "load_key",
    "main",
    "secret_from_options",
]


class _HelpRequested(Exception):  # noqa: N818 - control flow from argparse to main()
    def __init__(self, text: str) -> None:
        super().__init__("help")
        self.text = text


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors and help handed to :func:`main` instead of printed.

    So ``--json`` covers them too: a bad option is one JSON error document, like any other.
    """

    def error(self, message: str) -> NoReturn:
        raise ArgumentsError(message, usage=self.format_usage())

    def print_help(self, file: Any = None) -> None:
        raise _HelpRequested(self.format_help())


class ArgumentsError(UsageError):
    """The command line does not parse (unknown option, missing argument, bad choice)."""

    def __init__(self, message: str, *, usage: str) -> None:
        super().__init__(message)
        self.usage = usage


def _add_common_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before and after the subcommand's name. On subcommands the default is
    # SUPPRESS, so an option given before the name is not reset by the subparser.
    default: Any = False if top else argparse.SUPPRESS
    p.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="masked HTTP session log"
    )
    p.add_argument(
        "--json",
        action="store_true",
        default=default,
        help="one JSON document on stdout (also for errors); human text on stderr",
    )


def _add_config_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    default: Any = None if top else argparse.SUPPRESS
    p.add_argument(
        "--config",
        metavar="FILE",
        default=default,
        help="settings file (or $DPOP_HSM_CONFIG; default $XDG_CONFIG_HOME/dpop-hsm/config.toml)",
    )
    p.add_argument(
        "--config-profile",
        metavar="NAME",
        default=default,
        help="profile in the settings file (or $DPOP_HSM_CONFIG_PROFILE; default: 'default')",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dpop-hsm",
        description="OAuth 2.0 DPoP (RFC 9449) with keys in PKCS#11 tokens, TPMs or files.",
    )
    _add_common_options(parser, top=True)
    _add_config_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    keys.register(sub)
    net.register(sub)
    login.register(sub)
    demo.register(sub)
    listing.register(sub)
    for command in sub.choices.values():
        _add_common_options(command, top=False)
        if command.get_default("settings"):
            _add_config_options(command, top=False)
    return parser


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:  # argparse offers no public way to list subcommands
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def _configure_logging(verbose: bool) -> Callable[[], None]:
    """Send our loggers to stderr; returns a function that restores the previous setup."""
    logger = logging.getLogger("dpop_hsm")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logger.propagate = False

    def restore() -> None:
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]

    return restore


def fail(message: str, code: int) -> NoReturn:
    sys.stderr.write(f"dpop-hsm: error: {message}\n")
    raise SystemExit(code)


def _print_traceback() -> None:
    import traceback  # only with -v: start-up stays cheap

    traceback.print_exc(file=sys.stderr)


_PIN_VALUE = re.compile(r"(^|[;?&])pin-value=")


def _refuse_pins_on_the_command_line(args: argparse.Namespace) -> None:
    """Refuse a ``pkcs11:`` reference with ``pin-value`` given as an argument.

    Arguments are visible to every local user (``ps``, ``/proc/PID/cmdline``) and kept in shell
    history. Called on the parsed arguments before settings are filled in from the environment
    and the config file, so only what was typed is checked; ``$DPOP_HSM_KEY`` (readable by this
    user only) may still carry a ``pin-value``, with the backend's warning. The message names
    the option, never the value.
    """
    for dest, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if (
                isinstance(item, str)
                and item[:7].lower() == "pkcs11:"
                and _PIN_VALUE.search(item[7:].lower())
            ):
                flag = "--" + dest.replace("_", "-")
                raise UsageError(
                    f"{flag} carries a pin-value: a PIN on the command line is visible to other "
                    "users (ps) and kept in shell history; put pin-source=env:NAME or "
                    f"file:PATH in the URI, or use --pin-source or ${PIN_ENV}"
                )


def _wants_json(argv: Sequence[str]) -> bool:
    """``--json`` anywhere before ``--``: known before parsing, so parse errors obey it too."""
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dpop-hsm``; returns the exit code.

    Exit codes: 0 ok, 1 unexpected, 2 usage, 3 configuration, 4 hardware or key, 5 server or
    protocol, 6 verification, 130 interrupted. Under ``--json`` stdout is exactly one JSON
    document for success and failure alike (``{"error": {"code", "message", "hint"}}``).
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    as_json = _wants_json(arguments)
    with reserved_stdout(as_json) as stream:
        return _run(build_parser(), arguments, Output(as_json=as_json, stream=stream))


def _run(parser: argparse.ArgumentParser, arguments: list[str], out: Output) -> int:
    verbose = False
    restore: Callable[[], None] | None = None
    try:
        args = parser.parse_args(arguments)
        verbose = bool(args.verbose)
        restore = _configure_logging(verbose)
        _refuse_pins_on_the_command_line(args)
        names = getattr(args, "settings", None) or ()
        if getattr(args, "profile", None) and getattr(args, "profile_settings", None):
            names = args.profile_settings  # see settings.PROFILE_SETTINGS
        resolve_settings(args, names)
        code: int = args.func(args, out)
        return code
    except _HelpRequested as e:
        out.emit({"help": e.text}, e.text)
        return EXIT_OK
    except ArgumentsError as e:
        if not out.as_json:
            sys.stderr.write(e.usage)
        command = next((a for a in arguments if a in _commands(parser)), "COMMAND")
        out.error(e.code, e.message, f"see 'dpop-hsm {command} --help'")
        return EXIT_USAGE
    except DPoPError as e:
        if verbose:
            _print_traceback()
        out.error(*error_parts(e))
        return exit_code_for(e)
    except KeyboardInterrupt:
        out.error("interrupted", "interrupted", None)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:
        # A bug, not bad input: one line (the type only: its text may hold anything), and
        # the traceback with -v.
        if verbose:
            _print_traceback()
        out.error(
            "internal_error",
            f"unexpected {type(e).__name__}",
            "run again with -v for the traceback, and report it",
        )
        return EXIT_UNEXPECTED
    finally:
        if restore is not None:
            restore()
