"""The one JSON reader for untrusted input: token responses, proofs, assertions, metadata.

Python's ``json`` is lenient where a security protocol must not be: it accepts duplicate
member names (the last one wins, while another parser may take the first — a parser
differential an attacker can aim at, e.g. ``"token_type":"Bearer","token_type":"DPoP"``),
``NaN``/``Infinity`` (not JSON; ``exp: NaN`` compares false with everything, so expiry and
replay checks are skipped), and, given bytes, UTF-16/UTF-32 and a leading byte-order mark.
RFC 8259 §8.1 requires UTF-8 without a BOM for JSON exchanged between systems, and §4 says
names SHOULD be unique; we refuse both, and refuse non-finite numbers.

Every failure is a :class:`StrictJsonError` (a ``ValueError``) whose message names the rule
broken and never repeats the input: callers wrap it in their own typed error.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["StrictJsonError", "loads_strict"]


class StrictJsonError(ValueError):
    """The text is not JSON we accept; the message says which rule it broke."""


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise StrictJsonError("duplicate member name in a JSON object (RFC 8259 §4)")
        result[name] = value
    return result


def _refuse_constant(name: str) -> Any:
    raise StrictJsonError(f"{name} is not a JSON number (RFC 8259 §6)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf
        raise StrictJsonError("number out of the finite range (RFC 8259 §6)")
    return value


# Built once: json.loads(text, **hooks) constructs a new JSONDecoder on every call (~2 us, a few
# per cent of a whole proof verification, which parses two of these). Same parse as json.loads.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_object_without_duplicates,
    parse_constant=_refuse_constant,
    parse_float=_finite_float,
)


def loads_strict(data: bytes | str) -> Any:
    """Parse ``data`` as strict JSON: UTF-8 (no BOM), unique names, finite numbers only.

    Raises :class:`StrictJsonError` for anything else, including nesting too deep to parse.
    """
    if isinstance(data, bytes | bytearray):
        if data.startswith(b"\xef\xbb\xbf"):
            raise StrictJsonError("JSON text starts with a byte-order mark (RFC 8259 §8.1)")
        try:
            text = bytes(data).decode("utf-8", "strict")
        except UnicodeDecodeError as e:
            raise StrictJsonError("JSON text is not UTF-8 (RFC 8259 §8.1)") from e
    else:
        text = data
    if text.startswith("\ufeff"):
        raise StrictJsonError("JSON text starts with a byte-order mark (RFC 8259 §8.1)")
    try:
        return _DECODER.decode(text)
    except StrictJsonError:
        raise
    except RecursionError as e:
        raise StrictJsonError("JSON nested too deeply") from e
    except ValueError as e:  # json.JSONDecodeError
        raise StrictJsonError("not valid JSON") from e
