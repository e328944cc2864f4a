"""RFC 9110 §11.6.1 WWW-Authenticate parsing: several challenges, quoted commas, token68."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpop_hsm.challenges import (
    MAX_HEADER_LENGTH,
    ChallengeParseError,
    find_challenge,
    parse_www_authenticate,
)
from dpop_hsm.errors import ProtocolError


def test_single_dpop_challenge() -> None:
    [c] = parse_www_authenticate('DPoP algs="ES256 PS256", error="use_dpop_nonce"')
    assert c.scheme == "DPoP"
    assert dict(c.params) == {"algs": "ES256 PS256", "error": "use_dpop_nonce"}
    assert c.token68 is None


def test_several_challenges_in_one_header_with_quoted_commas() -> None:
    # RFC 9449 §7.1 example style, with a comma inside the quoted description.
    header = (
        'Bearer realm="api, v2", error="invalid_token", '
        'DPoP algs="ES256", error="use_dpop_nonce", error_description="nonce, please"'
    )
    bearer, dpop = parse_www_authenticate(header)
    assert bearer.scheme == "Bearer" and bearer.params["realm"] == "api, v2"
    assert dpop.is_scheme("dpop")
    assert dpop.params["error_description"] == "nonce, please"


def test_challenges_across_several_header_fields() -> None:
    found = parse_www_authenticate(['Basic realm="x"', "Negotiate abc123==", "DPoP algs=ES256"])
    assert [c.scheme for c in found] == ["Basic", "Negotiate", "DPoP"]
    assert found[1].token68 == "abc123=="
    assert found[2].params["algs"] == "ES256"


def test_escapes_and_case_insensitive_names() -> None:
    [c] = parse_www_authenticate(r'DPoP ERROR="a\"b\\c", Realm=r1')
    assert c.params["error"] == 'a"b\\c'
    assert c.params["realm"] == "r1"


def test_bare_schemes_empty_elements_and_whitespace() -> None:
    found = parse_www_authenticate(" , Basic ,, DPoP\t ,Bearer")
    assert [c.scheme for c in found] == ["Basic", "DPoP", "Bearer"]
    assert all(not c.params for c in found)


def test_token68_then_another_challenge() -> None:
    found = parse_www_authenticate("Foo dGVzdA==, DPoP error=invalid_token")
    assert found[0].token68 == "dGVzdA==" and found[1].params["error"] == "invalid_token"


@pytest.mark.parametrize(
    "bad",
    [
        'DPoP error="unterminated',
        "DPoP a=b c=d",
        "DPoP =x",
        'DPoP error="a" junk',
        "DPoP error=a, error=b",  # repeated parameter (RFC 9110 §11.2)
        "DPoP@ x",
        'DPoP a="\x01"',
    ],
)
def test_malformed_headers_raise_our_typed_error(bad: str) -> None:
    with pytest.raises(ChallengeParseError) as info:
        parse_www_authenticate(bad)
    assert isinstance(info.value, ProtocolError)
    assert find_challenge(bad) is None  # transports treat garbage as "no challenge"


def test_size_is_bounded() -> None:
    with pytest.raises(ChallengeParseError):
        parse_www_authenticate('DPoP a="' + "x" * MAX_HEADER_LENGTH + '"')


def test_pathological_input_is_linear() -> None:
    # Inputs that make backtracking regexes explode: many commas/quotes/equals signs.
    for text in ("a=" * 5000, ", " * 8000, 'DPoP x="' + "\\a" * 5000, "DPoP " + "a=b, " * 3000):
        with contextlib.suppress(ChallengeParseError):
            parse_www_authenticate(text[:MAX_HEADER_LENGTH])


def test_find_challenge_picks_dpop_among_others() -> None:
    c = find_challenge(['Bearer realm="x"', 'DPoP error="invalid_token"'])
    assert c is not None and c.params["error"] == "invalid_token"
    assert find_challenge('Bearer realm="x"') is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_parses_or_raises_only_our_error(text: str) -> None:
    try:
        result = parse_www_authenticate(text)
    except ChallengeParseError:
        return
    assert all(c.scheme for c in result)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True),
            st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20),
        ),
        max_size=5,
        unique_by=lambda kv: kv[0],
    )
)
def test_quoted_values_round_trip(params: list[tuple[str, str]]) -> None:
    def quote(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'

    header = "Bearer, DPoP " + ", ".join(f"{k}={quote(v)}" for k, v in params)
    if not params:
        header = "Bearer, DPoP"
    found = parse_www_authenticate(header)
    assert dict(found[-1].params) == dict(params)
