"""``WWW-Authenticate`` parsing (RFC 9110 §11.6.1, §11.2, §5.6.4) for resource-server challenges.

A header may carry several challenges (``Bearer realm="api", DPoP algs="ES256"``) and a response
may carry several headers; quoted strings may hold commas and backslash escapes (RFC 9449 §7.1
errors often do). Naive ``split(",")`` parsers get these wrong, so this is a small linear scanner:
one pass, no regular expression that could backtrack, a bounded input size, and one typed error
(:class:`ChallengeParseError`) for anything that is not the RFC grammar.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .errors import ProtocolError

__all__ = [
    "MAX_HEADER_LENGTH",
    "Challenge",
    "ChallengeParseError",
    "find_challenge",
    "parse_www_authenticate",
]

MAX_HEADER_LENGTH = 16 * 1024
MAX_CHALLENGES = 32

# RFC 9110 §5.6.2 tchar
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# RFC 9110 §11.2 token68 (without the trailing "=" padding)
_T68CHAR = frozenset("-._~+/0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_OWS = frozenset(" \t")


class ChallengeParseError(ProtocolError):
    """A ``WWW-Authenticate`` header does not follow RFC 9110 §11.6.1."""

    code = "malformed_challenge"


@dataclass(frozen=True)
class Challenge:
    """One auth challenge: scheme (as sent), parameters (names lowercased), or a token68."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    token68: str | None = None

    def is_scheme(self, scheme: str) -> bool:
        """Auth schemes compare case-insensitively (RFC 9110 §11.1)."""
        return self.scheme.lower() == scheme.lower()


class _Scanner:
    __slots__ = ("pos", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ows(self) -> None:
        text, pos = self.text, self.pos
        while pos < len(text) and text[pos] in _OWS:
            pos += 1
        self.pos = pos

    def skip_ows_and_commas(self) -> None:
        text, pos = self.text, self.pos
        while pos < len(text) and (text[pos] in _OWS or text[pos] == ","):
            pos += 1
        self.pos = pos

    def token(self) -> str:
        text, start = self.text, self.pos
        pos = start
        while pos < len(text) and text[pos] in _TCHAR:
            pos += 1
        self.pos = pos
        return text[start:pos]

    def quoted_string(self) -> str:
        # RFC 9110 §5.6.4: DQUOTE *( qdtext / quoted-pair ) DQUOTE
        text = self.text
        pos = self.pos + 1  # past the opening quote
        out: list[str] = []
        while pos < len(text):
            ch = text[pos]
            if ch == '"':
                self.pos = pos + 1
                return "".join(out)
            if ch == "\\":
                if pos + 1 >= len(text):
                    break
                pos += 1
                ch = text[pos]
            if ch != "\t" and (ord(ch) < 0x20 or ord(ch) == 0x7F):
                raise ChallengeParseError(f"control character in quoted string at offset {pos}")
            out.append(ch)
            pos += 1
        raise ChallengeParseError("unterminated quoted string in WWW-Authenticate")

    def try_token68(self) -> str | None:
        """A token68 only counts when it ends the challenge (followed by "," or the end)."""
        text, start = self.text, self.pos
        pos = start
        while pos < len(text) and text[pos] in _T68CHAR:
            pos += 1
        if pos == start:
            return None
        while pos < len(text) and text[pos] == "=":
            pos += 1
        end = pos
        while pos < len(text) and text[pos] in _OWS:
            pos += 1
        if pos < len(text) and text[pos] != ",":
            return None
        self.pos = pos
        return text[start:end]

    def next_is_param(self) -> bool:
        """After a comma: is the next list element ``name=...`` (a parameter) or a new scheme?"""
        text, pos = self.text, self.pos
        while pos < len(text) and text[pos] in _TCHAR:
            pos += 1
        if pos == self.pos:
            return False
        while pos < len(text) and text[pos] in _OWS:
            pos += 1
        return pos < len(text) and text[pos] == "="


def _parse_one(text: str, out: list[Challenge]) -> None:
    s = _Scanner(text)
    while True:
        s.skip_ows_and_commas()
        if s.at_end():
            return
        scheme = s.token()
        if not scheme:
            raise ChallengeParseError(f"expected an auth-scheme at offset {s.pos}")
        if len(out) >= MAX_CHALLENGES:
            raise ChallengeParseError(f"more than {MAX_CHALLENGES} challenges")
        params: dict[str, str] = {}
        token68: str | None = None
        if s.peek() in _OWS:
            s.skip_ows()
            if not s.at_end() and s.peek() != ",":
                token68 = s.try_token68()
                if token68 is None:
                    _parse_params(s, params)
        elif not s.at_end() and s.peek() != ",":
            raise ChallengeParseError(f"unexpected character after scheme at offset {s.pos}")
        out.append(Challenge(scheme, MappingProxyType(params), token68))


def _parse_params(s: _Scanner, params: dict[str, str]) -> None:
    while True:
        name = s.token()
        if not name:
            raise ChallengeParseError(f"expected an auth-param name at offset {s.pos}")
        s.skip_ows()
        if s.peek() != "=":
            raise ChallengeParseError(f"expected '=' after auth-param {name[:40]!r}")
        s.pos += 1
        s.skip_ows()
        if s.peek() == '"':
            value = s.quoted_string()
        else:
            value = s.token()
            if not value:
                raise ChallengeParseError(f"auth-param {name[:40]!r} has no value")
        key = name.lower()
        if key in params:  # RFC 9110 §11.2: each name only once per challenge
            raise ChallengeParseError(f"auth-param {key[:40]!r} repeated in one challenge")
        params[key] = value
        s.skip_ows()
        if s.at_end():
            return
        if s.peek() != ",":
            raise ChallengeParseError(f"expected ',' at offset {s.pos}")
        s.skip_ows_and_commas()
        if s.at_end() or not s.next_is_param():
            return


def parse_www_authenticate(values: str | Iterable[str]) -> list[Challenge]:
    """All challenges in one header value or in several header fields, in order.

    Raises :class:`ChallengeParseError` on malformed input or when the combined size exceeds
    ``MAX_HEADER_LENGTH`` characters (a hostile server should not make us burn CPU or memory).
    """
    items = [values] if isinstance(values, str) else list(values)
    if not all(isinstance(v, str) for v in items):  # bytes iterate as ints: check first
        raise ChallengeParseError("WWW-Authenticate value is not text")
    if sum(len(v) for v in items) > MAX_HEADER_LENGTH:
        raise ChallengeParseError(f"WWW-Authenticate longer than {MAX_HEADER_LENGTH} characters")
    out: list[Challenge] = []
    for value in items:
        if not isinstance(value, str):
            raise ChallengeParseError("WWW-Authenticate value is not text")
        _parse_one(value, out)
    return out


def find_challenge(values: str | Iterable[str], scheme: str = "DPoP") -> Challenge | None:
    """The first challenge for ``scheme``; None when absent *or* when the headers are malformed.

    Transports use this to decide on a retry; malformed challenges mean "no retry", never a crash.
    """
    try:
        challenges = parse_www_authenticate(values)
    except ChallengeParseError:
        return None
    return next((c for c in challenges if c.is_scheme(scheme)), None)
