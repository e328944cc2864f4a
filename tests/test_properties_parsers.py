"""Property tests for the protocol parsers: RFC 7512 ``pkcs11:`` URIs and ``WWW-Authenticate``.

Rule: a value or our typed error, never a bare built-in exception, never a hang; where a
printer exists, print-then-parse gives the same value back. Set ``HYPOTHESIS_PROFILE=long`` for
~20x more examples.
"""

from __future__ import annotations

import os
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpop_hsm.errors import DPoPError, KeyReferenceError

_LONG = os.environ.get("HYPOTHESIS_PROFILE", "") == "long"


def examples(n: int) -> int:
    return n * 20 if _LONG else n


FAST = settings(deadline=2000, suppress_health_check=[HealthCheck.too_slow])

# Unicode text without lone surrogates: what a str from a UTF-8 source can hold.
clean_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)

# --- RFC 7512 pkcs11: URIs -----------------------------------------------------------------

pkcs11_uri = pytest.importorskip("dpop_hsm.signers.pkcs11_uri", reason="pkcs11_uri not landed")
Pkcs11Uri = pkcs11_uri.Pkcs11Uri

vendor_name = st.from_regex(r"x-[A-Za-z0-9_.~-]{1,8}", fullmatch=True)


@st.composite
def uris(draw: st.DrawFn) -> Any:
    values: dict[str, Any] = {}
    for attr in (
        "token",
        "manufacturer",
        "serial",
        "model",
        "library_manufacturer",
        "library_description",
        "slot_manufacturer",
        "slot_description",
        "object",
        "module_name",
        "module_path",
    ):
        if draw(st.booleans()):
            values[attr] = draw(clean_text)
    if draw(st.booleans()):
        values["library_version"] = draw(
            st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,3})?", fullmatch=True)
        )
    if draw(st.booleans()):
        values["slot_id"] = draw(st.integers(0, 2**64 - 1))  # CK_SLOT_ID is a CK_ULONG
    if draw(st.booleans()):
        values["type"] = draw(st.sampled_from(["public", "private", "cert", "secret-key", "data"]))
    if draw(st.booleans()):
        values["id"] = draw(st.binary(max_size=20))
    pin = draw(st.sampled_from(["none", "source", "value"]))
    if pin == "source":
        values["pin_source"] = draw(clean_text)
    elif pin == "value":
        values["pin_value"] = draw(clean_text)
    names = draw(st.lists(vendor_name, max_size=3, unique=True))
    values["vendor_path"] = tuple((n, draw(clean_text)) for n in names)
    qnames = draw(st.lists(vendor_name, max_size=3))
    values["vendor_query"] = tuple((n, draw(clean_text)) for n in qnames)
    return Pkcs11Uri(**values)


@settings(FAST, max_examples=examples(300))
@given(uris())
def test_pkcs11_uri_round_trip(uri: Any) -> None:
    text = uri.to_string(include_pin=True)
    assert Pkcs11Uri.parse(text) == uri
    # The printed form without the PIN parses too, and drops only the PIN.
    assert Pkcs11Uri.parse(str(uri)) == uri.replace(pin_value=None)


@settings(FAST, max_examples=examples(200))
@given(uris(), st.text(alphabet=string.ascii_letters + string.digits, min_size=12, max_size=16))
def test_pkcs11_uri_never_shows_the_pin(uri: Any, pin: str) -> None:
    secret = "PIN" + pin
    with_pin = uri.replace(pin_value=secret, pin_source=None)
    assert secret not in str(with_pin)
    assert secret not in repr(with_pin)
    assert secret not in with_pin.describe_token() + with_pin.describe_key()


_URI_ALPHABET = string.ascii_letters + string.digits + ";?&=%:/-_.~x# \x00\x7f" + "\u00e9\u2028"


@settings(FAST, max_examples=examples(500))
@given(
    st.one_of(
        st.text(st.characters(exclude_categories=["Cs"]), max_size=60),
        st.builds(lambda s: "pkcs11:" + s, st.text(alphabet=_URI_ALPHABET, max_size=60)),
        st.builds(
            lambda parts: "pkcs11:" + ";".join(parts),
            st.lists(
                st.builds(
                    "{}={}".format,
                    st.sampled_from(["token", "id", "slot-id", "type", "x-v", "object", "bad"]),
                    st.text(alphabet=_URI_ALPHABET, max_size=10),
                ),
                max_size=5,
            ),
        ),
    )
)
def test_pkcs11_uri_arbitrary_text_only_typed_errors(text: str) -> None:
    try:
        parsed = Pkcs11Uri.parse(text)
    except KeyReferenceError:
        return
    assert Pkcs11Uri.parse(parsed.to_string(include_pin=True)) == parsed


def test_pkcs11_uri_constructor_and_parser_agree_on_slot_id_range() -> None:
    with pytest.raises(KeyReferenceError):
        Pkcs11Uri(slot_id=2**64)


@pytest.mark.parametrize("bad", [None, 7, b"pkcs11:token=a", ["pkcs11:"]])
def test_pkcs11_uri_wrong_types(bad: Any) -> None:
    with pytest.raises(KeyReferenceError):
        Pkcs11Uri.parse(bad)


# Regression (found by this suite): lone surrogates raised UnicodeEncodeError in _pct_decode.
@pytest.mark.parametrize(
    "text", ["pkcs11:token=\udcff", "pkcs11:x-a=\ud800", "pkcs11:object=a?pin-value=\udc80"]
)
def test_pkcs11_uri_lone_surrogates_are_typed_errors(text: str) -> None:
    with pytest.raises(KeyReferenceError):
        Pkcs11Uri.parse(text)


# Regression (found by this suite): int() of a > 4300-digit slot-id raised ValueError.
def test_pkcs11_uri_huge_slot_id_is_a_typed_error() -> None:
    with pytest.raises(KeyReferenceError):
        Pkcs11Uri.parse("pkcs11:slot-id=" + "1" * 5000)


# --- WWW-Authenticate ----------------------------------------------------------------------

challenges = pytest.importorskip("dpop_hsm.challenges", reason="challenges not landed")
parse_www_authenticate = challenges.parse_www_authenticate
ChallengeParseError = challenges.ChallengeParseError

TCHARS = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
token = st.text(alphabet=TCHARS, min_size=1, max_size=12)
# qdtext / quoted-pair content (RFC 9110 §5.6.4): any visible char, space, tab, obs-text.
quoted_content = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
    | st.sampled_from(["\t", '"', "\\", ","]),
    max_size=30,
)


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def challenge_list(draw: st.DrawFn) -> list[tuple[str, dict[str, str]]]:
    out = []
    for _ in range(draw(st.integers(1, 6))):
        scheme = draw(token)
        names = draw(st.lists(token.map(str.lower), max_size=4, unique=True))
        out.append((scheme, {n: draw(quoted_content) for n in names}))
    return out


def render(items: list[tuple[str, dict[str, str]]], ows: str) -> str:
    parts = []
    for scheme, params in items:
        rendered = ("," + ows).join(f"{n}{ows}={ows}{quote(v)}" for n, v in params.items())
        parts.append(scheme + (" " + rendered if rendered else ""))
    return ("," + ows).join(parts)


@settings(FAST, max_examples=examples(300))
@given(challenge_list(), st.sampled_from(["", " ", "  \t"]))
def test_www_authenticate_round_trip(items: list[tuple[str, dict[str, str]]], ows: str) -> None:
    parsed = parse_www_authenticate(render(items, ows))
    assert [(c.scheme, dict(c.params)) for c in parsed] == items


@settings(FAST, max_examples=examples(100))
@given(challenge_list(), st.integers(1, 4))
def test_www_authenticate_several_header_fields(
    items: list[tuple[str, dict[str, str]]], split: int
) -> None:
    fields = [render(items[:split], " "), render(items[split:], " ")]
    parsed = parse_www_authenticate([f for f in fields if f])
    assert [(c.scheme, dict(c.params)) for c in parsed] == items


hostile_header = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=TCHARS + ' ,="\\\t=\x00\x7f\u00ff', max_size=200),
    st.lists(st.text(alphabet=TCHARS + ' ,="\\', max_size=40), max_size=5),
)


@settings(FAST, max_examples=examples(600))
@given(hostile_header)
def test_www_authenticate_arbitrary_headers_only_typed_errors(value: Any) -> None:
    try:
        parsed = parse_www_authenticate(value)
    except ChallengeParseError:
        return
    for challenge in parsed:
        assert challenge.scheme and set(challenge.scheme) <= set(TCHARS)
        assert all(k == k.lower() for k in challenge.params)


@settings(FAST, max_examples=examples(100))
@given(hostile_header)
def test_find_challenge_never_raises(value: Any) -> None:
    found = challenges.find_challenge(value)
    assert found is None or found.is_scheme("dpop")


def test_www_authenticate_many_challenges_and_huge_headers_are_bounded() -> None:
    many = ", ".join(f'S{i} realm="r{i}"' for i in range(10_000))
    with pytest.raises(ChallengeParseError):
        parse_www_authenticate(many)
    with pytest.raises(ChallengeParseError):
        parse_www_authenticate(["DPoP"] * 100_000)
    with pytest.raises(ChallengeParseError):
        parse_www_authenticate('DPoP error="' + "\\," * 100_000 + '"')


def test_www_authenticate_quoted_commas_and_escapes() -> None:
    (bearer, dpop) = parse_www_authenticate(
        'Bearer realm="a, b", DPoP error="use_dpop_nonce", '
        'error_description="say \\"hi\\", then, retry", algs="ES256 PS256"'
    )
    assert bearer.params["realm"] == "a, b"
    assert dpop.params["error_description"] == 'say "hi", then, retry'
    assert dpop.params["algs"] == "ES256 PS256"


# Regression (found by this suite): bytes or [None] raised TypeError before the str check.
@pytest.mark.parametrize("value", [b"DPoP x=1", [None]])
def test_www_authenticate_non_text_values_are_typed_errors(value: Any) -> None:
    with pytest.raises(DPoPError):
        parse_www_authenticate(value)


def test_www_authenticate_list_of_bytes_is_a_typed_error() -> None:
    with pytest.raises(ChallengeParseError):
        parse_www_authenticate([b"DPoP"])  # type: ignore[list-item]


# --- DPoP-Nonce headers --------------------------------------------------------------------

nonces = pytest.importorskip("dpop_hsm.nonces", reason="nonce store not landed")


@settings(FAST, max_examples=examples(300))
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ["DPoP-Nonce", "dpop-nonce", "DPOP-NONCE", "Other", "WWW-Authenticate"]
            ),
            st.text(max_size=40) | st.text(alphabet=string.printable, max_size=2000),
        ),
        max_size=6,
    )
)
def test_nonce_headers_yield_a_valid_nonce_or_none(headers: list[tuple[str, str]]) -> None:
    store = nonces.NonceStore(max_origins=2)
    found = store.observe("https://rs.example.com/x", headers)
    if found is not None:
        assert nonces.is_valid_nonce(found)
        assert store.get("https://rs.example.com/other") == found
    for status in (400, 401, 200):
        assert nonces.is_nonce_challenge(status, headers, b"") in (True, False)
