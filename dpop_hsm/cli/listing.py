"""``dpop-hsm list``: the keys this machine can sign with, each with the reference to paste.

PKCS#11 modules (found where ``module-name`` is looked up, or named with ``--module-name`` /
``--module-path``) → their tokens → the keys on each, with a ready RFC 7512 URI per key; and
the TPM's persistent handles (``--tcti``) with their ``tpm2:handle=…`` reference. The
enumeration lives in :mod:`~dpop_hsm.cli.inventory`; this module is the command and its text.

The listing never logs in unless asked (``--login``); with ``--login`` the PIN comes from the
usual sources (``--pin-source``, ``$DPOP_HSM_PIN``, a prompt naming the token). A module or TPM
that fails is reported in its entry and the listing goes on: the point is to see what is there.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from .common import EXIT_OK, PIN_ENV, Output

__all__ = ["cmd_list", "register"]


# --- the command -----------------------------------------------------------------------------


def _text(result: dict[str, Any]) -> str:
    lines: list[str] = []
    p11 = result.get("pkcs11")
    if p11 is not None:
        if p11["error"]:
            lines.append(f"PKCS#11: {_error_text(p11['error'])}")
        if p11.get("note"):
            lines.append(f"PKCS#11: {p11['note']}")
        for module in p11["modules"]:
            lines += _module_text(module)
        if not p11["modules"] and not p11["error"]:
            lines.append("PKCS#11: no modules found (name one with --module-path)")
    for tpm in result.get("tpm") or ():
        lines += _tpm_text(tpm)
    return "\n".join(lines)


def _error_text(error: dict[str, Any]) -> str:
    hint = f" ({error['hint']})" if error.get("hint") else ""
    return f"error [{error['code']}]: {error['message']}{hint}"


def _module_text(module: dict[str, Any]) -> Iterable[str]:
    head = f"PKCS#11 module {module['path']}"
    if module["error"]:
        yield f"{head}: {_error_text(module['error'])}"
        return
    yield f"{head} ({module.get('manufacturer')}: {module.get('description')})"
    if not module["tokens"]:
        yield "  no token present"
    for token in module["tokens"]:
        if not token["initialized"]:
            yield f"  slot without an initialized token (serial {token['serial'] or '-'})"
            continue
        state = ""
        if token["login_required"] and not token["logged_in"]:
            state = "; not logged in: --login also shows keys that have no public object"
        yield f"  token {token['label']!r} (serial {token['serial']}, {token['model']}{state})"
        yield f"    {token['uri']}"
        if token["error"]:
            yield f"    {_error_text(token['error'])}"
        elif not token["keys"]:
            yield "    no keys visible"
        for key in token["keys"]:
            what = key.get("curve") or (f"{key['bits']} bits" if key.get("bits") else "?")
            yield (
                f"    {key['type'] or '?'} {what}  {key['alg'] or 'not usable'}  "
                f"label {key['label']!r} id {key['id'] or '-'}  ({'+'.join(key['objects'])})"
            )
            yield f"      {key['uri']}"


def _tpm_text(tpm: dict[str, Any]) -> Iterable[str]:
    head = f"TPM {tpm['tcti']}"
    if tpm["error"]:
        yield f"{head}: {_error_text(tpm['error'])}"
        return
    if tpm.get("note"):
        yield f"{head}: {tpm['note']}"
        return
    yield head + ("" if tpm["handles"] else ": no persistent keys")
    for item in tpm["handles"]:
        what = f"{item['type']} {item['curve'] or ''}".strip()
        if item["usable"]:
            yield f"  {item['handle']}  {what}  {item['alg']}  jkt {item['jkt']}"
            yield f"    {item['ref']}"
        else:
            yield f"  {item['handle']}  {what}  not usable: {item['reason']}"


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    from .inventory import list_pkcs11, list_tpm

    result: dict[str, Any] = {}
    if not args.no_pkcs11:
        result["pkcs11"] = list_pkcs11(args)
    if not args.no_tpm:
        result["tpm"] = list_tpm(args)
    out.emit(result, _text(result))
    return EXIT_OK


def register(sub: Any) -> None:
    """Add ``list`` to the main parser's subparsers."""
    p = sub.add_parser(
        "list",
        help="PKCS#11 modules, tokens and keys, and TPM persistent keys, with their references",
        description="Lists what this machine can sign with and the reference to paste into "
        "--key. Never logs in unless --login is given.",
    )
    p.add_argument("--module-path", action="append", metavar="PATH", help="repeatable")
    p.add_argument("--module-name", action="append", metavar="NAME", help="repeatable")
    p.add_argument("--token", metavar="LABEL", help="only the token with this label")
    p.add_argument(
        "--login",
        action="store_true",
        help=f"log in to tokens that need it (PIN: --pin-source, ${PIN_ENV}, or a prompt)",
    )
    p.add_argument("--pin-source", metavar="SRC", help="PIN from env:NAME or file:PATH")
    p.add_argument("--tcti", action="append", metavar="TCTI", help="TPM to list (repeatable)")
    p.add_argument("--no-pkcs11", action="store_true", help="skip PKCS#11 modules")
    p.add_argument("--no-tpm", action="store_true", help="skip the TPM")
    p.set_defaults(func=cmd_list, settings=("pin_source",))
