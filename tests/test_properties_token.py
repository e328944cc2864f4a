"""Property tests for the sans-IO token response parser (``TokenClient.parse_response``).

Whatever JSON (or not-JSON) an authorization server sends — wrong types, huge numbers, missing
or negative ``expires_in``, unicode, non-DPoP token types, any status — the result is a usable
DPoP :class:`Token` or one of our typed errors, and a Token never shows its access token.
``HYPOTHESIS_PROFILE=long`` gives ~20x more examples.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpop_hsm.errors import DPoPError, OAuthError, TokenResponseError, TokenTypeError
from dpop_hsm.signers.software import SoftwareSigner

token_mod = pytest.importorskip("dpop_hsm.token", reason="token client not landed")
token_http = pytest.importorskip("dpop_hsm.token_http", reason="token client not landed")
HttpResponse = token_http.HttpResponse

_LONG = os.environ.get("HYPOTHESIS_PROFILE", "") == "long"


def examples(n: int) -> int:
    return n * 20 if _LONG else n


FAST = settings(deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def client() -> Any:
    return token_mod.TokenClient(
        SoftwareSigner.generate("ES256"),
        token_endpoint="https://as.example.com/token",
        client_id="client-1",
        client_secret="client-secret-property",  # a fixture
    )


def parse(client: Any, status: int, body: bytes) -> Any:
    response = HttpResponse(status, (("Content-Type", "application/json"),), body)
    return client.parse_response(response, sent_monotonic=time.monotonic(), sent_wall=time.time())


json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.sampled_from(["DPoP", "dpop", "Bearer", "N_A", "3600", " 60 ", "-5", "0", "1.5", ""]),
)
json_value = st.recursive(
    json_scalar,
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3)
    ),
    max_leaves=6,
)
MEMBERS = [
    "access_token",
    "token_type",
    "expires_in",
    "scope",
    "refresh_token",
    "error",
    "error_description",
]


@st.composite
def token_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {
        "access_token": draw(st.sampled_from(["at-" + "x" * 20, "tok"]) | json_value),
        "token_type": draw(st.sampled_from(["DPoP", "dpop", "DPOP", "Bearer"]) | json_value),
    }
    for name in draw(st.lists(st.sampled_from(MEMBERS), max_size=4)):
        body[name] = draw(json_value)
    for name in draw(st.lists(st.sampled_from(["access_token", "token_type"]), max_size=2)):
        body.pop(name, None)
    return body


def check(result: Any) -> None:
    """A returned Token must be genuinely usable; anything raised must be ours."""
    assert result.is_dpop, "a non-DPoP token was accepted"
    assert math.isfinite(result.lifetime) and result.lifetime > 0
    assert result.renew_at <= result.expires_at
    assert result.access_token.isascii() and " " not in result.access_token
    if len(result.access_token) >= 8:
        assert result.access_token not in repr(result)
        assert result.access_token not in str(result)


@settings(FAST, max_examples=examples(400))
@given(token_bodies(), st.sampled_from([200, 200, 200, 201, 204, 400, 401, 403, 302, 500, 503]))
def test_token_response_arbitrary_json_only_typed_errors(
    client: Any, body: dict[str, Any], status: int
) -> None:
    try:
        result = parse(client, status, json.dumps(body).encode())
    except DPoPError:
        return
    assert status == 200
    check(result)


@settings(FAST, max_examples=examples(300))
@given(st.binary(max_size=300), st.sampled_from([200, 400, 401, 500]))
def test_token_response_arbitrary_bytes_only_typed_errors(
    client: Any, body: bytes, status: int
) -> None:
    with contextlib.suppress(DPoPError):
        check(parse(client, status, body))


@settings(FAST, max_examples=examples(100))
@given(st.text(max_size=40))
def test_token_response_unicode_access_tokens_are_refused_or_header_safe(
    client: Any, access_token: str
) -> None:
    body = {"access_token": access_token, "token_type": "DPoP", "expires_in": 60}
    try:
        token = parse(client, 200, json.dumps(body).encode())
    except TokenResponseError:
        return
    assert token.access_token.isascii() and token.access_token.isprintable()


@pytest.mark.parametrize(
    ("expires_in", "lifetime"),
    [(None, "default"), (1, 1.0), (3600, 3600.0), ("60", 60.0), (1.5, 1.5), (1e300, 1e300)],
)
def test_token_response_lifetimes(client: Any, expires_in: Any, lifetime: Any) -> None:
    body: dict[str, Any] = {"access_token": "a" * 20, "token_type": "DPoP"}
    if expires_in is not None:
        body["expires_in"] = expires_in
    token = parse(client, 200, json.dumps(body).encode())
    assert token.lifetime == (client.default_lifetime if lifetime == "default" else lifetime)
    check(token)


@pytest.mark.parametrize(
    "raw_expires_in",
    ["0", "-1", "-3600", "1e400", "-1e400", '"-5"', '"abc"', "true", "[]", "{}", '""', '"1.5"'],
)
def test_token_response_bad_expires_in_is_a_typed_error(client: Any, raw_expires_in: str) -> None:
    body = '{"access_token":"aaaaaaaaaa","token_type":"DPoP","expires_in":' + raw_expires_in + "}"
    with pytest.raises(TokenResponseError):
        parse(client, 200, body.encode())


# Regression (found by this suite, fixed in 0e0281d): TokenClient._lifetime called int() on any
# string whose .strip().isdigit() ("²", 5000 digits -> ValueError) and math.isfinite() on JSON
# integers beyond the float range (-> OverflowError).
@pytest.mark.parametrize(
    "raw_expires_in",
    ['"\\u00b2"', '"' + "9" * 5000 + '"', "9" * 400, '"' + "9" * 400 + '"'],
    ids=["superscript-two", "5000-digit-string", "1e400-int", "400-digits"],
)
def test_token_response_exotic_expires_in_is_a_typed_error(
    client: Any, raw_expires_in: str
) -> None:
    body = '{"access_token":"aaaaaaaaaa","token_type":"DPoP","expires_in":' + raw_expires_in + "}"
    with pytest.raises(TokenResponseError):
        parse(client, 200, body.encode())


@pytest.mark.parametrize("token_type", ["Bearer", "bearer", "N_A", "DPoP2", "mac", "DPoP "])
def test_token_response_downgrade_is_refused(client: Any, token_type: str) -> None:
    body = {"access_token": "a" * 20, "token_type": token_type, "expires_in": 60}
    with pytest.raises(TokenTypeError):
        parse(client, 200, json.dumps(body).encode())


@pytest.mark.parametrize("error", ["invalid_client", "use_dpop_nonce", "x" * 10_000, "\x1b[31m"])
def test_token_error_responses_are_oauth_errors_with_bounded_printable_text(
    client: Any, error: str
) -> None:
    body = json.dumps({"error": error, "error_description": "\x00\n" + "d" * 10_000})
    with pytest.raises(OAuthError) as info:
        parse(client, 400, body.encode())
    message = str(info.value)
    assert len(message) < 1000
    assert "\x1b" not in message and "\x00" not in message


def test_token_response_oversized_body_is_refused(client: Any) -> None:
    huge = b'{"access_token":"' + b"a" * (2 * 1024 * 1024) + b'","token_type":"DPoP"}'
    with pytest.raises(TokenResponseError):
        parse(client, 200, huge)


@pytest.mark.parametrize("depth", [100, 5000, 100_000])
def test_token_response_deep_nesting(client: Any, depth: int) -> None:
    body = b'{"access_token":"aaaaaaaaaa","token_type":"DPoP","x":' + b"[" * depth + b"]" * depth
    with pytest.raises(TokenResponseError):
        parse(client, 200, body + b"")  # unterminated object: never a RecursionError
    nested = body + b"}"
    with contextlib.suppress(TokenResponseError):
        check(parse(client, 200, nested))
