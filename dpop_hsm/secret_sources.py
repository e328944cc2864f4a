"""Where PINs, key passwords and client secrets come from — never from argv.

A *secret source* is one of: a callable returning the secret (the library never prompts; the
CLI passes a prompting callable), ``env:NAME``, ``file:PATH``, or a literal string given in
code. Resolution errors name the source, never the value, and chain no exception that holds it.

A secret file holds the secret and at most one line ending (``echo secret > file`` and editors
add one): exactly one trailing ``\n`` or ``\r\n`` is stripped, nothing else. A file with more
lines is refused rather than cut at its first line — a key file or an ``.env`` file named by
mistake would otherwise send its first line to the server as the secret. At most 64 KiB are
read, so ``/dev/zero`` or a huge file is an error, not a hang or an exhausted memory; a pipe
(``file:/dev/fd/3``, or ``<(pass show x)`` in a shell) is read like a file and, like a prompt,
waits for its writer. Secrets must be UTF-8: text with undecodable bytes (a surrogate escape
from the environment) is refused before it reaches a token or the network.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

from .bounded_read import read_bounded
from .errors import SecretSourceError

__all__ = ["SecretSource", "read_secret_source", "resolve_secret"]

SecretSource = str | bytes | Callable[[], str | bytes]

MAX_SECRET_FILE = 64 * 1024


def _utf8(value: str, what: str) -> str:
    # Lone surrogates are exactly what UTF-8 cannot encode (os.environ turns undecodable bytes
    # into them). Checked without encoding: a UnicodeError would carry the whole secret in
    # its ``.object``, and the chained exception along with ours.
    if not value.isascii() and any("\ud800" <= ch <= "\udfff" for ch in value):
        raise SecretSourceError(f"{what}: the secret is not valid UTF-8 text")
    return value


def _read_secret_file(path: Path, what: str) -> str:
    raw, _ = read_bounded(path, MAX_SECRET_FILE, f"{what}: {str(path)!r}", SecretSourceError)
    shown = repr(str(path))
    text = _utf8(raw.decode("utf-8", "surrogateescape"), f"{what}: {shown}")
    if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    if "\n" in text or "\r" in text:
        raise SecretSourceError(
            f"{what}: {shown} holds more than one line; a secret file holds the secret and at "
            "most one trailing newline"
        )
    return text


def read_secret_source(spec: str, *, what: str) -> str:
    """Read ``env:NAME`` or ``file:PATH`` (also ``file://`` URIs); ``what`` names it in errors."""
    if spec.startswith("env:"):
        name = spec[4:]
        value = os.environ.get(name)
        if not name or value is None:
            raise SecretSourceError(f"{what}: environment variable {name!r} is not set")
        return _utf8(value, what)
    if spec.startswith("file:"):
        raw = spec[5:]
        if raw.startswith("//"):
            raw = raw[2:]
            if not raw.startswith("/"):  # file://host/path: only the local host is allowed
                host, _, rest = raw.partition("/")
                if host not in ("", "localhost"):
                    raise SecretSourceError(f"{what}: file URI host {host!r} is not local")
                raw = "/" + rest
        return _read_secret_file(Path(unquote(raw)), what)
    raise SecretSourceError(f"{what}: source must be 'env:NAME' or 'file:PATH'")


def resolve_secret(source: SecretSource | None, *, what: str) -> str | None:
    """Turn a secret source into the secret, or ``None`` when no source was given."""
    if source is None:
        return None
    if callable(source):
        try:
            value = source()
        except Exception as e:  # a user callback may raise anything; keep the chain, not the text
            raise SecretSourceError(
                f"{what}: the secret callback failed ({type(e).__name__})"
            ) from e
        source = value
    if isinstance(source, bytes):
        return _utf8(source.decode("utf-8", "surrogateescape"), what)
    if isinstance(source, str):
        return _utf8(source, what)
    raise SecretSourceError(f"{what}: unsupported secret source type {type(source).__name__}")
