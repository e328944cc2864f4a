"""What ``dpop-hsm list`` finds: PKCS#11 modules → tokens → keys, and TPM persistent handles.

Each entry is a plain dict (the ``--json`` document); a module, token or TPM that fails carries
its typed error's ``code``, ``message`` and ``hint`` and the enumeration goes on. The backends
are imported when a function runs, never at import time.

No login unless asked (``--login``): public key objects are visible without a PIN on the tokens
we know, and a PIN sent to the wrong token counts against its retry limit, so one PIN is never
offered to several tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import DPoPError, PinError, SignerError, TokenNotPresentError
from .common import PIN_ENV, UsageError, error_parts, secret_from_options

__all__ = ["discover_modules", "list_pkcs11", "list_tpm"]

# Proxies and debugging shims: they forward to other modules (duplicates) or need their own
# configuration (pkcs11-spy wants $PKCS11SPY). Listed only when named explicitly.
_SKIPPED = ("p11-kit-proxy", "p11-kit-client", "pkcs11-spy")
_KNOWN_NAMES = ("softhsm2", "ykcs11", "tpm2_pkcs11", "opensc-pkcs11")
_P11KIT_DIRS = (Path("/etc/pkcs11/modules"), Path("/usr/share/p11-kit/modules"))
# JWK crv and JWS alg of the curves DPoP signs with (RFC 7518 §3.4, RFC 8037 §3.1).
_CURVES = {
    "secp256r1": ("P-256", "ES256"),
    "secp384r1": ("P-384", "ES384"),
    "secp521r1": ("P-521", "ES512"),
    "1.3.101.112": ("Ed25519", "EdDSA"),
    "ed25519": ("Ed25519", "EdDSA"),
    "edwards25519": ("Ed25519", "EdDSA"),
}


def _failure(error: DPoPError) -> dict[str, Any]:
    code, message, hint = error_parts(error)
    return {"code": code, "message": message, "hint": hint}


# --- PKCS#11 ---------------------------------------------------------------------------------


def discover_modules() -> list[Path]:
    """PKCS#11 module files where ``module-name`` lookup searches (Linux locations).

    Every ``*.so`` in the ``pkcs11``/``softhsm`` module directories and in
    ``$DPOP_HSM_PKCS11_MODULE_DIRS``, the well-known modules by name, p11-kit registrations
    and ``$DPOP_HSM_PKCS11_MODULE``; proxies skipped, each file once.
    """
    from ..errors import ConfigurationError
    from ..signers.pkcs11_uri import MODULE_DIRS_ENV, MODULE_ENV, module_search_dirs
    from ..signers.pkcs11_uri import resolve_module_name as resolve

    extra = {Path(d) for d in os.environ.get(MODULE_DIRS_ENV, "").split(os.pathsep) if d}
    found: list[Path] = []
    for d in module_search_dirs():
        if (d in extra or d.name in ("pkcs11", "softhsm")) and d.is_dir():
            found += sorted(p for p in d.glob("*.so") if p.is_file())
    names = list(_KNOWN_NAMES)
    for conf in _P11KIT_DIRS:
        if conf.is_dir():
            names += [reg.stem for reg in sorted(conf.glob("*.module"))]
    env = os.environ.get(MODULE_ENV, "")
    if env and os.sep in env:
        found.append(Path(env))
    elif env:
        names.append(env)
    for name in names:
        try:
            found.append(Path(resolve(name)))
        except (ConfigurationError, SignerError):
            continue  # not installed here
    unique: dict[str, Path] = {}
    for path in found:
        if not any(skip in path.name for skip in _SKIPPED):
            unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


def _portable_name(path: Path) -> str | None:
    """A ``module-name`` that finds this very file again, so the URI works on similar hosts."""
    from ..signers.pkcs11_uri import resolve_module_name

    name = path.name.removesuffix(".so").removeprefix("lib")
    try:
        same = os.path.realpath(resolve_module_name(name)) == os.path.realpath(path)
    except DPoPError:
        return None
    return name if same else None


def _curve(params: Any) -> tuple[str, str] | None:
    """JWK crv and JWS alg of CKA_EC_PARAMS: a named-curve OID, or (PKCS#11 3.0) a name."""
    from asn1crypto import core, keys

    if not isinstance(params, bytes):
        return None
    try:
        value = core.Asn1Value.load(params, strict=True)
        if isinstance(value, core.ObjectIdentifier):
            # NamedCurve knows the names (secp256r1, …); unknown OIDs stay dotted.
            return _CURVES.get(str(keys.NamedCurve.load(params, strict=True).native))
    except (ValueError, TypeError):
        return None
    if isinstance(value, core.PrintableString):
        return _CURVES.get(str(value.native).lower())
    return None


def _describe_key(obj: Any) -> dict[str, Any]:
    from pkcs11 import Attribute, KeyType, ObjectClass

    def read(attr: Any) -> Any:
        try:
            return obj[attr]
        except Exception:
            return None

    key_type = read(Attribute.KEY_TYPE)
    info: dict[str, Any] = {
        "label": read(Attribute.LABEL) or None,
        "id": (read(Attribute.ID) or b"").hex() or None,
        "class": "private" if read(Attribute.CLASS) == ObjectClass.PRIVATE_KEY else "public",
        "type": getattr(key_type, "name", None) if key_type is not None else None,
        "curve": None,
        "alg": None,
    }
    if key_type in (KeyType.EC, KeyType.EC_EDWARDS):
        curve = _curve(read(Attribute.EC_PARAMS))
        if curve is not None:
            info["curve"], info["alg"] = curve
    elif key_type == KeyType.RSA:
        bits = read(Attribute.MODULUS_BITS)
        modulus = read(Attribute.MODULUS)
        info["bits"] = int(bits) if bits else len(modulus) * 8 if modulus else None
        info["alg"] = "PS256" if (info["bits"] or 0) >= 2048 else None
    return info


def _token_keys(module: Any, token: Any, pin: str | None) -> list[dict[str, Any]]:
    """The token's private and public keys, merged per (label, id) pair."""
    from pkcs11 import Attribute, ObjectClass

    with module.gate.call():
        session = token.open()
    try:
        if pin is not None:
            module.login(session.handle, pin, what=f"token {token.label!r}")
        keys: dict[tuple[Any, Any], dict[str, Any]] = {}
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            with module.gate.call():
                objects = list(session.get_objects({Attribute.CLASS: cls}))
                described = [_describe_key(o) for o in objects]
            for info in described:
                entry = keys.setdefault((info["label"], info["id"]), {**info, "objects": []})
                entry["objects"].append(info["class"])
                for k in ("type", "curve", "alg", "bits"):
                    if entry.get(k) is None and info.get(k) is not None:
                        entry[k] = info[k]
    finally:
        with module.gate.call():
            session.close()
    result = []
    for entry in keys.values():
        del entry["class"]
        result.append(entry)
    return result


def _key_uri(base: Any, key: dict[str, Any]) -> str:
    return str(
        base.replace(
            object=key["label"],
            id=bytes.fromhex(key["id"]) if key["id"] else None,
            type="private" if "private" in key["objects"] else None,
        )
    )


def _list_module(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    from pkcs11 import TokenFlag

    from ..signers.pkcs11_module import load_module
    from ..signers.pkcs11_uri import Pkcs11Uri

    name = _portable_name(path)
    entry: dict[str, Any] = {"path": str(path), "module_name": name, "tokens": [], "error": None}
    try:
        module = load_module(str(path))
    except DPoPError as e:
        entry["error"] = _failure(e)
        return entry
    try:
        with module.gate.call():
            entry["manufacturer"] = module.lib.manufacturer_id.strip()
            entry["description"] = module.lib.library_description.strip()
            tokens = [slot.get_token() for slot in module.lib.get_slots(token_present=True)]
    except Exception as e:  # python-pkcs11's errors: a module failing is listed, not fatal
        # ykcs11 without pcscd answers CKR_DEVICE_ERROR here: the smart-card advice applies.
        failed = TokenNotPresentError(
            f"PKCS#11 module {str(path)!r}: no slots ({type(e).__name__})"
        )
        entry["error"] = _failure(failed)
        return entry
    labels = [t.label for t in tokens]
    wanted = [t for t in tokens if args.token is None or t.label == args.token]
    needs_login = [t for t in wanted if t.flags & TokenFlag.LOGIN_REQUIRED]
    pin_source = _pin_source(args) if args.login else None
    if pin_source is not None and not callable(pin_source) and len(needs_login) > 1:
        raise UsageError(
            f"--login with one PIN for {len(needs_login)} tokens of {str(path)!r}: a PIN sent "
            "to the wrong token counts against its retry limit; choose one with --token LABEL"
        )
    for token in wanted:
        serial = token.serial.decode("ascii", "replace").strip()
        base = Pkcs11Uri(
            token=token.label,
            serial=serial if labels.count(token.label) > 1 else None,
            module_name=name,
            module_path=None if name else str(path),
        )
        login = bool(token.flags & TokenFlag.LOGIN_REQUIRED)
        ready = bool(token.flags & TokenFlag.TOKEN_INITIALIZED)
        item: dict[str, Any] = {
            "label": token.label,
            "serial": serial,
            "manufacturer": token.manufacturer_id.strip(),
            "model": token.model.strip(),
            "initialized": ready,
            "login_required": login,
            "logged_in": False,
            "uri": str(base),
            "keys": [],
            "error": None,
        }
        if not ready:  # a free slot (SoftHSM2 keeps one): nothing to open
            entry["tokens"].append(item)
            continue
        try:
            pin = None
            if login and pin_source is not None:
                pin = pin_source(token.label) if callable(pin_source) else pin_source
            item["keys"] = _token_keys(module, token, pin)
            item["logged_in"] = pin is not None
        except (PinError, SignerError) as e:
            item["error"] = _failure(e)
        except Exception as e:
            item["error"] = {"code": "device_error", "message": type(e).__name__, "hint": None}
        for key in item["keys"]:
            key["uri"] = _key_uri(base, key)
        entry["tokens"].append(item)
    return entry


def _pin_source(args: argparse.Namespace) -> Any:
    """The PIN for ``--login``: a string from a source, or a per-token prompt, or nothing."""
    if args.pin_source:
        return secret_from_options(args.pin_source, env=None, what="PIN")
    if os.environ.get(PIN_ENV):
        return os.environ[PIN_ENV]
    if sys.stdin is not None and sys.stdin.isatty():
        import getpass

        return lambda label: getpass.getpass(f"PIN for token {label!r}: ")
    raise UsageError(
        f"--login needs a PIN: --pin-source env:NAME|file:PATH, ${PIN_ENV}, or a terminal"
    )


def list_pkcs11(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        from ..errors import MissingDependencyError

        return {"modules": [], "error": _failure(MissingDependencyError("pkcs11", "pkcs11"))}
    # tpm2-pkcs11 and the TSS inside it log to stderr on their own unless told not to.
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    if not args.verbose:
        os.environ.setdefault("TPM2_PKCS11_LOG_LEVEL", "0")
    paths = _explicit_modules(args)
    note = None
    if paths is None:
        paths = discover_modules()
        if not sys.platform.startswith("linux"):
            note = "module discovery knows Linux locations only: name modules with --module-path"
    return {"modules": [_list_module(p, args) for p in paths], "note": note, "error": None}


def _explicit_modules(args: argparse.Namespace) -> list[Path] | None:
    from ..signers.pkcs11_uri import resolve_module_name

    if not args.module_path and not args.module_name:
        return None
    paths = [Path(p) for p in args.module_path or ()]
    paths += [Path(resolve_module_name(n)) for n in args.module_name or ()]
    return paths


# --- TPM -------------------------------------------------------------------------------------


def list_tpm(args: argparse.Namespace) -> list[dict[str, Any]]:
    try:
        from ..signers.tpm_ref import DEFAULT_TCTI, default_tcti
    except DPoPError as e:
        return [{"tcti": None, "handles": [], "error": _failure(e)}]
    explicit = list(args.tcti or ())
    tctis = explicit or [default_tcti()]
    entries = []
    for tcti in tctis:
        if not explicit and tcti == DEFAULT_TCTI and not Path(tcti.partition(":")[2]).exists():
            entries.append({"tcti": tcti, "handles": [], "error": None, "note": "no TPM device"})
            continue
        entries.append(_list_tpm(tcti, keep_tcti=bool(explicit)))
    return entries


def _list_tpm(tcti: str, *, keep_tcti: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"tcti": tcti, "handles": [], "error": None}
    try:
        from tpm2_pytss import ESAPI, TPM2_ALG, TPM2_CAP, TPM2_ECC, TPMA_OBJECT, TSS2_Exception

        from ..signers.tpm import TpmSigner  # also quiets the TSS's own logging
        from ..signers.tpm_ref import PERSISTENT_FIRST, TpmReference
    except DPoPError as e:
        entry["error"] = _failure(e)
        return entry
    try:
        esapi = ESAPI(tcti)
    except TSS2_Exception as e:
        entry["error"] = _failure(TokenNotPresentError(f"no TPM answers at TCTI {tcti!r} ({e})"))
        return entry
    try:
        handles = _persistent_handles(esapi, TPM2_CAP.HANDLES, PERSISTENT_FIRST)
        for handle in handles:
            public, _, _ = esapi.read_public(esapi.tr_from_tpmpublic(handle))
            area = public.publicArea
            attrs = int(area.objectAttributes)
            kind = TPM2_ALG(int(area.type))
            item: dict[str, Any] = {
                "handle": f"{handle:#010x}",
                "type": str(kind).upper(),
                "curve": None,
                "sign": bool(attrs & int(TPMA_OBJECT.SIGN_ENCRYPT)),
                "restricted": bool(attrs & int(TPMA_OBJECT.RESTRICTED)),
                "alg": None,
                "jkt": None,
                "ref": TpmReference(handle=handle, tcti=tcti if keep_tcti else None).to_string(),
                "usable": False,
                "reason": None,
            }
            if int(area.type) == int(TPM2_ALG.ECC):
                item["curve"] = str(TPM2_ECC(int(area.parameters.eccDetail.curveID))).upper()
            entry["handles"].append(item)
    except TSS2_Exception as e:
        entry["error"] = _failure(TokenNotPresentError(f"TPM at TCTI {tcti!r}: {e}"))
        return entry
    finally:
        esapi.close()
    for item in entry["handles"]:
        # The signer is the one judge of what it can sign with.
        ref = TpmReference(handle=int(item["handle"], 16), tcti=tcti).to_string()
        try:
            with TpmSigner(ref) as signer:
                item.update(alg=signer.alg, jkt=signer.thumbprint, usable=True)
        except SignerError as e:
            item["reason"] = e.message
    return entry


def _persistent_handles(esapi: Any, cap: Any, first: int) -> list[int]:
    handles: list[int] = []
    more, start = True, first
    while more and start <= 0x81FFFFFF:
        more, data = esapi.get_capability(cap, start, 64)
        found = data.data.handles
        batch = [int(found[i]) for i in range(found.count)]  # count: empty TPMLs do not iterate
        handles += [h for h in batch if h <= 0x81FFFFFF]
        if not batch:
            break
        start = batch[-1] + 1
    return handles
