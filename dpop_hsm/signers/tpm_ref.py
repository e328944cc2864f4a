"""``tpm2:`` key references: parse, print, and resolve the TCTI and the key's auth value.

Grammar (attribute names are case-sensitive; values are percent-decoded, so a ``;`` or ``%`` in
a path or TCTI string is written ``%3B`` / ``%25``)::

    tpm2:handle=0x81010001[;tcti=TCTI][;auth-source=env:NAME|file:PATH][;alg=ES256|ES384]
    tpm2:blob=PATH[;tcti=TCTI][;auth-source=…][;alg=…]

- ``handle`` — a persistent object handle (``0x81000000``-``0x81FFFFFF``, hex or decimal): the
  key lives in the TPM's NV storage (``TpmSigner.generate(handle=…)``, ``tpm2_evictcontrol``).
- ``blob`` — a ``TSS2 PRIVATE KEY`` PEM file (the TCG "TPM 2.0 Key File" format that
  tpm2-openssl and tpm2-tss-engine also read and write): the key's public area and its private
  area *wrapped by the TPM's storage primary key*. The file is useless without that TPM; nothing
  in it is the private key in clear. Relative paths are relative to the working directory.
- ``tcti`` — a tpm2-tools style TCTI string such as ``swtpm:host=127.0.0.1,port=2321``,
  ``device:/dev/tpmrm0`` or ``tabrmd:bus_type=session``. Default: ``$TPM2TOOLS_TCTI``, then
  ``$TCTI``, then ``$TSS2_TCTI``, then ``device:/dev/tpmrm0`` (the kernel resource manager).
  The TSS loads the TCTI named before the ``:`` as a library, and some TCTIs run commands
  (``cmd:``), so a reference may only name ``device``, ``tabrmd``, ``mssim`` or ``swtpm``
  unless the caller passes ``allow_module_path=True``; the environment's TCTI is the
  operator's and is not restricted.
- ``auth-source`` — where the key's auth value (its "password") comes from. Resolution order:
  the ``secret`` given in code → ``auth-source`` → ``$DPOP_HSM_TPM_AUTH`` → empty auth.
  ``$DPOP_HSM_PIN`` is deliberately *not* read: it usually holds a PKCS#11 PIN, and offering a
  wrong auth value to a TPM key counts against the TPM's dictionary-attack lockout.
- ``alg`` — optional check: the key's curve must match (P-256 → ES256, P-384 → ES384).

This module imports nothing from tpm2-pytss, so references parse (and are tested) without it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from ..errors import KeyReferenceError, UntrustedModuleError
from ..secret_sources import SecretSource, read_secret_source, resolve_secret

__all__ = [
    "AUTH_ENV",
    "DEFAULT_TCTI",
    "PERSISTENT_FIRST",
    "PERSISTENT_LAST",
    "SAFE_TCTIS",
    "TCTI_ENVS",
    "TpmReference",
    "check_tcti",
    "default_tcti",
]

AUTH_ENV = "DPOP_HSM_TPM_AUTH"
TCTI_ENVS = ("TPM2TOOLS_TCTI", "TCTI", "TSS2_TCTI")
DEFAULT_TCTI = "device:/dev/tpmrm0"
# TPM 2.0 Part 2 §7.2 (TPM_HT_PERSISTENT) and the TCG handle registry: 0x81xxxxxx.
PERSISTENT_FIRST = 0x81000000
PERSISTENT_LAST = 0x81FFFFFF

_ATTRS = ("handle", "blob", "tcti", "auth-source", "alg")
_TPM_ALGS = ("ES256", "ES384")
_BAD_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_HANDLE = re.compile(r"0[xX][0-9A-Fa-f]{1,8}|[0-9]{1,10}")


def default_tcti(environ: Mapping[str, str] | None = None) -> str:
    """The TCTI used when a reference names none: the tpm2-tools variables, then tpmrm0."""
    env = os.environ if environ is None else environ
    for name in TCTI_ENVS:
        value = env.get(name, "").strip()
        if value:
            return value
    return DEFAULT_TCTI


# TCTIs that only open a device or a socket (TSS2 TCTI specification; tpm2-tss tctildr loads
# "libtss2-tcti-<name>.so.0"). Others run programs (cmd), load emulators (libtpms) or are
# library paths: code chosen by whoever wrote the reference.
SAFE_TCTIS = frozenset({"device", "tabrmd", "mssim", "swtpm"})


def check_tcti(tcti: str, *, allow_module_path: bool = False) -> str:
    """Return a reference's ``tcti`` if it only names a device or socket TCTI, else raise.

    Raises UntrustedModuleError before anything is loaded; ``allow_module_path=True`` is the
    caller vouching for the reference (the CLI, for a reference its user typed).
    """
    name = tcti.partition(":")[0]
    if allow_module_path or name in SAFE_TCTIS:
        return tcti
    raise UntrustedModuleError(
        f"tpm2 reference TCTI {name[:60]!r} is not one of {', '.join(sorted(SAFE_TCTIS))}: the "
        "TSS would load (or, for cmd:, run) what it names; set the TCTI in $TPM2TOOLS_TCTI, or "
        "pass allow_module_path=True if you trust the reference"
    )


def parse_handle(text: str) -> int:
    """A persistent handle from ``0x81010001`` or decimal; anything else is a reference error."""
    # ASCII digits only: int() alone would also take "+", "_" separators and non-ASCII digits.
    if not _HANDLE.fullmatch(text):
        raise KeyReferenceError(f"tpm2 handle {text!r} is not a number")
    value = int(text, 16) if text[:2] in ("0x", "0X") else int(text, 10)
    if not PERSISTENT_FIRST <= value <= PERSISTENT_LAST:
        raise KeyReferenceError(
            f"tpm2 handle {value:#x} is not a persistent handle (0x81000000-0x81ffffff)"
        )
    return value


@dataclass(frozen=True)
class TpmReference:
    """A parsed ``tpm2:`` reference: exactly one of ``handle`` / ``blob``, plus options."""

    handle: int | None = None
    blob: Path | None = None
    tcti: str | None = None
    auth_source: str | None = None
    alg: str | None = None

    def __post_init__(self) -> None:
        if (self.handle is None) == (self.blob is None):
            raise KeyReferenceError("tpm2 reference needs exactly one of 'handle' or 'blob'")
        if self.handle is not None:
            parse_handle(str(self.handle))
        if self.alg is not None and self.alg not in _TPM_ALGS:
            raise KeyReferenceError(
                f"tpm2 alg {self.alg!r} is not supported (use {' or '.join(_TPM_ALGS)})"
            )
        if self.auth_source is not None and (
            not self.auth_source.startswith(("env:", "file:"))
            or self.auth_source in ("env:", "file:")
        ):
            raise KeyReferenceError("tpm2 auth-source must be 'env:NAME' or 'file:PATH'")
        if self.tcti == "":  # would print as "tcti=", which does not parse back
            raise KeyReferenceError("tpm2 tcti must not be empty")

    @classmethod
    def parse(cls, ref: str) -> TpmReference:
        """Parse ``tpm2:attr=value;…``; unknown or repeated attributes are errors, not ignored."""
        scheme, sep, body = ref.partition(":")
        if not sep or scheme.lower() != "tpm2":
            raise KeyReferenceError("not a tpm2: reference")
        if not body:
            raise KeyReferenceError("tpm2 reference is empty (tpm2:handle=… or tpm2:blob=…)")
        values: dict[str, str] = {}
        for part in body.split(";"):
            if not part:
                continue
            name, eq, raw = part.partition("=")
            if not eq:
                raise KeyReferenceError(f"tpm2 reference attribute {name!r} has no '=value'")
            if name not in _ATTRS:
                raise KeyReferenceError(
                    f"tpm2 reference attribute {name!r} is unknown (known: {', '.join(_ATTRS)})"
                )
            if name in values:
                raise KeyReferenceError(f"tpm2 reference attribute {name!r} is given twice")
            if _BAD_PCT.search(raw):
                raise KeyReferenceError(f"tpm2 reference attribute {name!r}: bad %-escape")
            try:
                value = unquote(raw, errors="strict")
            except UnicodeDecodeError as e:
                raise KeyReferenceError(
                    f"tpm2 reference attribute {name!r}: %-escapes are not UTF-8"
                ) from e
            if not value:
                raise KeyReferenceError(f"tpm2 reference attribute {name!r} is empty")
            values[name] = value
        return cls(
            handle=parse_handle(values["handle"]) if "handle" in values else None,
            blob=Path(values["blob"]) if "blob" in values else None,
            tcti=values.get("tcti"),
            auth_source=values.get("auth-source"),
            alg=values.get("alg"),
        )

    def to_string(self) -> str:
        """The reference as text (it never holds a secret: auth values come from sources)."""
        parts = [f"handle={self.handle:#010x}" if self.handle is not None else ""]
        if self.blob is not None:
            parts = ["blob=" + quote(str(self.blob), safe="/:@!$'()*+,=-._~")]
        for name, value in (
            ("tcti", self.tcti),
            ("auth-source", self.auth_source),
            ("alg", self.alg),
        ):
            if value is not None:
                parts.append(f"{name}={quote(value, safe='/:@!$()*+,=-._~')}")
        return "tpm2:" + ";".join(parts)

    def __str__(self) -> str:
        return self.to_string()

    def resolved_tcti(self, *, allow_module_path: bool = False) -> str:
        """This reference's TCTI (checked by :func:`check_tcti`), else the environment's, else
        the kernel resource manager. Raises UntrustedModuleError."""
        if self.tcti is not None:
            return check_tcti(self.tcti, allow_module_path=allow_module_path)
        return default_tcti()

    def describe_key(self) -> str:
        """A short non-secret description for error messages."""
        if self.handle is not None:
            return f"persistent handle {self.handle:#010x}"
        return f"key blob {str(self.blob)!r}"


def resolve_auth(
    secret: SecretSource | None,
    auth_source: str | None,
    *,
    what: str,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The key auth value: ``secret`` → ``auth-source`` → ``$DPOP_HSM_TPM_AUTH`` → None.

    None means "no source gave one" (the caller uses empty auth). Errors name the source only.
    """
    if secret is not None:
        return resolve_secret(secret, what=what)
    if auth_source is not None:
        return read_secret_source(auth_source, what=what)
    env = os.environ if environ is None else environ
    return resolve_secret(env.get(AUTH_ENV), what=what)
