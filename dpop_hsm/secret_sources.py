"""Where PINs, key passwords and client secrets come from — never from argv.

A *secret source* is one of: a callable returning the secret (the library never prompts; the
CLI passes a prompting callable), ``env:NAME``, ``file:PATH`` (first line, trailing newline
stripped), or a literal string given in code. Resolution errors name the source, never the value.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

from .errors import SecretSourceError

__all__ = ["SecretSource", "read_secret_source", "resolve_secret"]

SecretSource = str | bytes | Callable[[], str | bytes]


def read_secret_source(spec: str, *, what: str) -> str:
    """Read ``env:NAME`` or ``file:PATH`` (also ``file://`` URIs); ``what`` names it in errors."""
    if spec.startswith("env:"):
        name = spec[4:]
        value = os.environ.get(name)
        if not name or value is None:
            raise SecretSourceError(f"{what}: environment variable {name!r} is not set")
        return value
    if spec.startswith("file:"):
        raw = spec[5:]
        if raw.startswith("//"):
            raw = raw[2:]
            if not raw.startswith("/"):  # file://host/path: only the local host is allowed
                host, _, rest = raw.partition("/")
                if host not in ("", "localhost"):
                    raise SecretSourceError(f"{what}: file URI host {host!r} is not local")
                raw = "/" + rest
        path = Path(unquote(raw))
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise SecretSourceError(f"{what}: cannot read {str(path)!r}: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise SecretSourceError(f"{what}: {str(path)!r} is not UTF-8 text") from e
        return text.splitlines()[0] if text else ""
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
        try:
            return source.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SecretSourceError(f"{what}: secret bytes are not UTF-8") from e
    if isinstance(source, str):
        return source
    raise SecretSourceError(f"{what}: unsupported secret source type {type(source).__name__}")
