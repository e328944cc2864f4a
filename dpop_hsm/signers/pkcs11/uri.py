"""RFC 7512 ``pkcs11:`` URIs: parse, print (never the PIN), name the module, resolve the PIN.

The URI is the form p11-kit, OpenSSL and GnuTLS users already write, so a key reference can be
copied from ``p11tool --list-privkeys`` or ``pkcs11-tool``. Parsing is strict where the RFC's
grammar is (§2.3: known attribute names or ``x-`` vendor names, each path attribute at most
once, well-formed percent-encoding) and keeps vendor attributes instead of dropping them, so
printing a parsed URI gives back what the user wrote (minus ``pin-value``).

This module imports nothing from python-pkcs11: it is usable (and tested) without the extra.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from ...errors import KeyReferenceError, Pkcs11ModuleNotFoundError, SecretSourceError
from ...secret_sources import SecretSource, read_secret_source, resolve_secret
from .locate import (
    MODULE_DIRS_ENV,
    MODULES_ENV,
    check_module_path,
    module_search_dirs,
    resolve_module_name,
)

__all__ = [
    "MODULES_ENV",
    "MODULE_DIRS_ENV",
    "MODULE_ENV",
    "PIN_ENV",
    "Pkcs11Uri",
    "module_search_dirs",
    "resolve_module_name",
]

log = logging.getLogger("dpop_hsm.pkcs11")

PIN_ENV = "DPOP_HSM_PIN"
MODULE_ENV = "DPOP_HSM_PKCS11_MODULE"


def _fields(*names: str) -> dict[str, str]:
    # Each attribute is stored in the Pkcs11Uri field of the same name, '-' written as '_'.
    return {name: name.replace("-", "_") for name in names}


# RFC 7512 §2.3, in the order the RFC lists them (also the order we print them in).
_PATH_ATTRS = _fields(
    "token",
    "manufacturer",
    "serial",
    "model",
    "library-manufacturer",
    "library-description",
    "library-version",
    "slot-manufacturer",
    "slot-description",
    "slot-id",
    "object",
    "type",
    "id",
)
_QUERY_ATTRS = _fields("pin-source", "pin-value", "module-name", "module-path")
_TYPES = frozenset({"public", "private", "cert", "secret-key", "data"})
_VENDOR_NAME = re.compile(r"x-[A-Za-z0-9_.~-]+\Z")  # RFC 7512 §2.3 pk11-v-attr-nm
_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_LIBRARY_VERSION = re.compile(r"[0-9]+(\.[0-9]+)?\Z")
# RFC 7512 §2.3 pk11-p-special / pk11-q-special: printed unescaped; everything else is %XX.
_PATH_SAFE = ":[]@!$'()*+,=-._~"  # '&' is escaped: it would read as a typo for '?'
_QUERY_SAFE = ":[]@!$'()*+,=/?|-._~"


def _pct_decode(raw: str, name: str) -> bytes:
    if _PCT.search(raw):
        raise KeyReferenceError(f"pkcs11 URI attribute {name!r}: malformed percent-encoding")
    try:
        data = raw.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. a non-UTF-8 argv byte
        raise KeyReferenceError(f"pkcs11 URI attribute {name!r}: not valid Unicode") from None
    return unquote_to_bytes(data)


def _text(raw: str, name: str) -> str:
    try:
        return _pct_decode(raw, name).decode("utf-8")
    except UnicodeDecodeError:
        raise KeyReferenceError(f"pkcs11 URI attribute {name!r}: not UTF-8") from None


# A known attribute name right after the wrong separator: "…;object=k&module-name=x" (an '&'
# in the path, where '?' was meant) or "…?module-name=x;pin-source=…" (a ';' in the query).
_QUERY_AFTER_AMP = re.compile("&(" + "|".join(map(re.escape, _QUERY_ATTRS)) + ")=")
_ATTR_AFTER_SEMI = re.compile(";(" + "|".join(map(re.escape, (*_QUERY_ATTRS, *_PATH_ATTRS))) + ")=")


def _check_separators(path: str, query: str) -> None:
    """Name the common separator typos instead of failing later on a strange value.

    RFC 7512 §2.3: path attributes are separated by ';', the query starts at '?' and its
    attributes are separated by '&'. A literal '&' or ';' in a value is written %26 or %3B.
    """
    amp = _QUERY_AFTER_AMP.search(path)
    if amp:
        raise KeyReferenceError(
            f"pkcs11 URI has '&{amp.group(1)}=' in its path: query attributes start after '?' "
            f"(pkcs11:…?{amp.group(1)}=…); write a literal '&' in a value as %26"
        )
    semi = _ATTR_AFTER_SEMI.search(query)
    if semi:
        raise KeyReferenceError(
            f"pkcs11 URI has ';{semi.group(1)}=' in its query: query attributes are separated by "
            "'&' (and path attributes go before '?'); write a literal ';' in a value as %3B"
        )


def _case_hint(name: str) -> str:
    lowered = name.lower()
    if lowered != name and (lowered in _PATH_ATTRS or lowered in _QUERY_ATTRS):
        return f"; attribute names are lower-case: {lowered!r}"
    return ""


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed RFC 7512 URI. ``id`` is bytes (CKA_ID); ``object`` is the key's CKA_LABEL.

    ``pin_value`` is kept out of ``repr`` and ``str``; ``vendor_path``/``vendor_query`` hold the
    ``x-`` attributes in the order written.
    """

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    library_manufacturer: str | None = None
    library_description: str | None = None
    library_version: str | None = None
    slot_manufacturer: str | None = None
    slot_description: str | None = None
    slot_id: int | None = None
    object: str | None = None
    type: str | None = None
    id: bytes | None = None
    pin_source: str | None = None
    pin_value: str | None = None
    module_name: str | None = None
    module_path: str | None = None
    vendor_path: tuple[tuple[str, str], ...] = ()
    vendor_query: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.id is not None and not isinstance(self.id, bytes):
            raise KeyReferenceError("pkcs11 URI attribute 'id': must be bytes (CKA_ID)")
        if self.type is not None and self.type not in _TYPES:
            raise KeyReferenceError(
                f"pkcs11 URI attribute 'type': {self.type!r} is not one of {sorted(_TYPES)}"
            )
        if self.library_version is not None and not _LIBRARY_VERSION.match(self.library_version):
            raise KeyReferenceError(
                "pkcs11 URI attribute 'library-version': must be 'M' or 'M.N' (RFC 7512 §2.3)"
            )
        if self.slot_id is not None and (
            not isinstance(self.slot_id, int) or not 0 <= self.slot_id < 1 << 64
        ):
            # CK_SLOT_ID is a CK_ULONG; parse() enforces the same range, so str() round-trips.
            raise KeyReferenceError("pkcs11 URI attribute 'slot-id': must be in [0, 2**64)")

    def __repr__(self) -> str:
        return f"Pkcs11Uri({str(self)!r})"

    # Parsing ---------------------------------------------------------------------------------
    @classmethod
    def parse(cls, uri: str) -> Pkcs11Uri:
        """Parse ``pkcs11:path?query``; raises KeyReferenceError naming the bad attribute."""
        if not isinstance(uri, str):
            raise KeyReferenceError("pkcs11 URI must be a string")
        scheme, sep, rest = uri.partition(":")
        if not sep or scheme.lower() != "pkcs11":
            raise KeyReferenceError("not a pkcs11: URI")
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in rest) or "#" in rest:
            raise KeyReferenceError("pkcs11 URI contains control characters or a fragment")
        if rest.startswith("//"):
            raise KeyReferenceError(
                "pkcs11 URI has '//' after 'pkcs11:': RFC 7512 URIs have no authority; "
                "write pkcs11:token=…;object=…"
            )
        path, _, query = rest.partition("?")
        _check_separators(path, query)
        values: dict[str, object] = {}
        vendor_path: list[tuple[str, str]] = []
        vendor_query: list[tuple[str, str]] = []
        seen: set[str] = set()
        for part in path.split(";") if path else ():
            name, eq, raw = part.partition("=")
            if not eq:
                raise KeyReferenceError(f"pkcs11 URI path attribute {name!r} has no '='")
            # RFC 7512 §2.3: each path attribute at most once.
            if name in seen:
                raise KeyReferenceError(f"pkcs11 URI attribute {name!r} appears twice")
            seen.add(name)
            if name in _PATH_ATTRS:
                values[_PATH_ATTRS[name]] = cls._path_value(name, raw)
            elif _VENDOR_NAME.match(name):
                vendor_path.append((name, _text(raw, name)))
            elif name in _QUERY_ATTRS:
                raise KeyReferenceError(
                    f"pkcs11 URI: {name!r} is a query attribute: put it after '?' "
                    f"(pkcs11:…?{name}=…), not between the ';'-separated path attributes"
                )
            else:
                raise KeyReferenceError(
                    f"pkcs11 URI path attribute {name!r} is not defined by RFC 7512 "
                    f"(vendor attributes start with 'x-'){_case_hint(name)}"
                )
        qseen: set[str] = set()
        for part in query.split("&") if query else ():
            name, eq, raw = part.partition("=")
            if not eq:
                raise KeyReferenceError(f"pkcs11 URI query attribute {name!r} has no '='")
            if name in _QUERY_ATTRS:
                if name in qseen:
                    raise KeyReferenceError(f"pkcs11 URI attribute {name!r} appears twice")
                qseen.add(name)
                values[_QUERY_ATTRS[name]] = _text(raw, name)
            elif _VENDOR_NAME.match(name):
                vendor_query.append((name, _text(raw, name)))
            elif name in _PATH_ATTRS:
                raise KeyReferenceError(
                    f"pkcs11 URI: {name!r} is a path attribute: put it before '?', separated "
                    f"by ';' (pkcs11:…;{name}=…?…)"
                )
            else:
                raise KeyReferenceError(
                    f"pkcs11 URI query attribute {name!r} is not defined by RFC 7512 "
                    f"(vendor attributes start with 'x-'){_case_hint(name)}"
                )
        if "pin_source" in values and "pin_value" in values:
            raise KeyReferenceError(
                "pkcs11 URI has both 'pin-source' and 'pin-value': give one (RFC 7512 §2.3)"
            )
        return cls(
            **values,  # type: ignore[arg-type]  # keys come from the attribute tables above
            vendor_path=tuple(vendor_path),
            vendor_query=tuple(vendor_query),
        )

    @staticmethod
    def _path_value(name: str, raw: str) -> Any:
        if name == "id":
            return _pct_decode(raw, name)
        text = _text(raw, name)
        if name == "slot-id":
            # CK_SLOT_ID is a CK_ULONG: at most 20 decimal digits, below 2**64.
            if not text.isdigit() or not text.isascii() or len(text) > 20 or int(text) >= 1 << 64:
                raise KeyReferenceError("pkcs11 URI attribute 'slot-id': must be a decimal number")
            return int(text)
        return text

    # Printing --------------------------------------------------------------------------------
    def to_string(self, *, include_pin: bool = False) -> str:
        """The URI text; ``pin-value`` only when ``include_pin`` (never in logs)."""
        path: list[str] = []
        for name, attr in _PATH_ATTRS.items():
            value = getattr(self, attr)
            if value is None:
                continue
            if isinstance(value, bytes):
                text = "".join(f"%{b:02x}" for b in value)  # RFC 7512 §2.3: id always %XX
            else:
                text = quote(str(value), safe=_PATH_SAFE)
            path.append(f"{name}={text}")
        path += [f"{n}={quote(v, safe=_PATH_SAFE)}" for n, v in self.vendor_path]
        query: list[str] = []
        for name, attr in _QUERY_ATTRS.items():
            value = getattr(self, attr)
            if value is None or (name == "pin-value" and not include_pin):
                continue
            query.append(f"{name}={quote(value, safe=_QUERY_SAFE)}")
        query += [f"{n}={quote(v, safe=_QUERY_SAFE)}" for n, v in self.vendor_query]
        return "pkcs11:" + ";".join(path) + ("?" + "&".join(query) if query else "")

    def __str__(self) -> str:
        return self.to_string()

    def replace(self, **changes: Any) -> Pkcs11Uri:
        """A copy with some attributes changed (``dataclasses.replace`` with our checks)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise KeyReferenceError(f"unknown pkcs11 URI attribute(s): {sorted(unknown)}")
        return replace(self, **changes)

    # Module ----------------------------------------------------------------------------------
    def module(self, *, allow_module_path: bool = False) -> str:
        """The PKCS#11 module file to load.

        ``module-path`` wins over ``module-name`` (RFC 7512 §2.3), and is checked by
        :func:`~.locate.check_module_path` first: loading a module runs its code, so a path
        outside the trusted module directories needs ``$DPOP_HSM_PKCS11_MODULES`` or the
        caller's ``allow_module_path=True``. With neither attribute, the
        ``DPOP_HSM_PKCS11_MODULE`` environment variable names a path or a module name (the
        environment is the operator's, so its path is trusted).

        Raises KeyReferenceError when nothing names a module, UntrustedModuleError for a path
        that is not allowed, Pkcs11ModuleNotFoundError (naming what was tried) when there is
        no such module file.
        """
        if self.module_path:
            check_module_path(self.module_path, allow_module_path=allow_module_path)
            path = Path(self.module_path)
            if not path.is_file():
                raise Pkcs11ModuleNotFoundError(
                    f"PKCS#11 module file {self.module_path!r} (module-path=) does not exist"
                )
            return str(path)
        if self.module_name:
            return resolve_module_name(self.module_name)
        env = os.environ.get(MODULE_ENV)
        if env:
            if os.sep in env:
                if not Path(env).is_file():
                    raise Pkcs11ModuleNotFoundError(
                        f"PKCS#11 module file {env!r} (from {MODULE_ENV}) does not exist"
                    )
                return env
            return resolve_module_name(env)
        raise KeyReferenceError(
            f"pkcs11 URI names no module: add 'module-path=' or 'module-name=', or set {MODULE_ENV}"
        )

    # PIN -------------------------------------------------------------------------------------
    def resolve_pin(self, secret: SecretSource | None = None) -> str | None:
        """The user PIN: ``secret`` → ``pin-source`` → ``pin-value`` → ``$DPOP_HSM_PIN``.

        ``pin-source`` accepts ``file:`` (RFC 7512 §2.3), our ``env:NAME`` extension and a
        plain absolute path. ``pin-value`` works but logs a warning: a PIN inside a key
        reference ends up in shell history and process listings. Returns None when no source
        gives a PIN (the key may not need one). Errors name the source, never the PIN.
        """
        what = f"PIN for {self.describe_token()}"
        if secret is not None:
            return resolve_secret(secret, what=what)
        if self.pin_source is not None:
            source = self.pin_source
            if source.startswith("/"):
                source = "file:" + source
            if source.startswith("|"):
                raise SecretSourceError(f"{what}: pin-source commands ('|…') are not supported")
            return read_secret_source(source, what=what)
        if self.pin_value is not None:
            log.warning(
                "pkcs11 URI for %s carries 'pin-value': prefer pin-source=file:… or env:…",
                self.describe_token(),
            )
            return resolve_secret(self.pin_value, what=what)
        return resolve_secret(os.environ.get(PIN_ENV), what=what)

    def describe_token(self) -> str:
        """The token attributes a URI selects by, for messages: ``token='dpop', serial='…'``,
        or ``any token`` (never the PIN)."""
        bits = [
            f"{n}={getattr(self, a)!r}"
            for n, a in (("token", "token"), ("serial", "serial"), ("slot-id", "slot_id"))
            if getattr(self, a) is not None
        ]
        return ", ".join(bits) if bits else "any token"

    def describe_key(self) -> str:
        bits = []
        if self.object is not None:
            bits.append(f"object={self.object!r}")
        if self.id is not None:
            bits.append(f"id={self.id.hex()}")
        return ", ".join(bits) if bits else "(any key)"
