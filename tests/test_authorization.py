"""The authorization request: parameters, URL with and without PAR, the PAR response."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import pytest

from dpop_hsm.authorization import (
    PushedRequest,
    authorization_params,
    authorization_url,
    new_authorization_request,
    new_state,
    parse_par_response,
    pushed_authorization_url,
)
from dpop_hsm.errors import ConfigurationError, OAuthError, PushedAuthorizationError
from dpop_hsm.pkce import s256_challenge
from dpop_hsm.sansio import HttpResponse

JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
REDIRECT = "http://127.0.0.1:50123/callback"


def request(**changes: Any) -> Any:
    options: dict[str, Any] = {"client_id": "cli", "redirect_uri": REDIRECT, "jkt": JKT}
    options.update(changes)
    return new_authorization_request(**options)


def test_parameters() -> None:
    req = request(scope=["openid", "offline_access"], resource=["https://api.example.com/"])
    params = dict(authorization_params(req))
    assert params == {
        "response_type": "code",
        "client_id": "cli",
        "redirect_uri": REDIRECT,
        "scope": "openid offline_access",
        "state": req.state,
        "code_challenge": s256_challenge(req.pkce.verifier),
        "code_challenge_method": "S256",
        "dpop_jkt": JKT,
        "resource": "https://api.example.com/",
    }
    assert req.state not in repr(req) and req.pkce.verifier not in repr(req)


def test_every_attempt_is_fresh() -> None:
    a, b = request(), request()
    assert a.state != b.state and a.pkce.verifier != b.pkce.verifier
    assert len({new_state() for _ in range(100)}) == 100
    assert len(new_state()) >= 43


def test_url_without_par_carries_everything() -> None:
    req = request(scope="openid", resource=["https://a.example", "https://b.example"])
    url = authorization_url("https://as.example.com/authorize", req)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "as.example.com", "/authorize")
    query = parse_qs(parts.query)
    assert query["dpop_jkt"] == [JKT] and query["state"] == [req.state]
    assert query["resource"] == ["https://a.example", "https://b.example"]
    assert "code_verifier" not in query and req.pkce.verifier not in url


def test_endpoint_query_is_kept() -> None:
    url = authorization_url("https://as.example.com/authorize?tenant=7", request())
    pairs = parse_qsl(urlsplit(url).query)
    assert pairs[0] == ("tenant", "7") and ("client_id", "cli") in pairs
    with pytest.raises(ConfigurationError):
        authorization_url("https://as.example.com/authorize?state=x", request())


def test_url_with_par_carries_only_client_id_and_request_uri() -> None:
    pushed = PushedRequest("urn:ietf:params:oauth:request_uri:6esc_11ACC5bwc014ltc14eY22c", 60)
    url = pushed_authorization_url(
        "https://as.example.com/authorize", client_id="cli", pushed=pushed
    )
    assert parse_qsl(urlsplit(url).query) == [
        ("client_id", "cli"),
        ("request_uri", pushed.request_uri),
    ]


def test_code_challenge_matches_verifier() -> None:
    req = request()
    assert req.pkce.challenge == s256_challenge(req.pkce.verifier)


@pytest.mark.parametrize(
    "changes",
    [
        {"client_id": ""},
        {"resource": "relative/path"},
        {"resource": "https://api.example.com/#frag"},
        {"resource": ["urn-without-authority"]},
        {"extra": [("state", "mine")]},
        {"extra": [("dpop_jkt", "other")]},
        {"extra": [("request_uri", "x")]},
    ],
)
def test_bad_requests(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        request(**changes)


def test_extra_parameters() -> None:
    req = request(extra=[("prompt", "login")])
    assert authorization_params(req)[-1] == ("prompt", "login")


# --- PAR response ------------------------------------------------------------------------------


def answer(document: Any, status: int = 201) -> HttpResponse:
    return HttpResponse(status, (), json.dumps(document).encode())


def test_rfc9126_example_response() -> None:
    pushed = parse_par_response(
        answer(
            {
                "request_uri": "urn:ietf:params:oauth:request_uri:6esc_11ACC5bwc014ltc14eY22c",
                "expires_in": 60,
            }
        )
    )
    assert pushed.expires_in == 60 and pushed.request_uri.startswith("urn:ietf")
    assert parse_par_response(answer({"request_uri": "r", "expires_in": 90}, 200)).expires_in == 90


def test_a_par_lifetime_beyond_the_float_range_is_bounded() -> None:
    # A JSON integer has no size limit; math.isfinite(10**400) raises OverflowError.
    assert parse_par_response(answer({"request_uri": "r", "expires_in": 10**400})).expires_in == 600


@pytest.mark.parametrize(
    "document",
    [
        {},
        {"request_uri": "", "expires_in": 60},
        {"request_uri": 5, "expires_in": 60},
        {"request_uri": "a b", "expires_in": 60},
        {"request_uri": "é", "expires_in": 60},
        {"request_uri": "x" * 5000, "expires_in": 60},
        {"request_uri": "urn:x", "expires_in": 0},
        {"request_uri": "urn:x", "expires_in": "60"},
        {"request_uri": "urn:x", "expires_in": True},
        {"request_uri": "urn:x"},
        [],
    ],
)
def test_hostile_par_responses(document: Any) -> None:
    with pytest.raises(PushedAuthorizationError):
        parse_par_response(answer(document))


def test_par_error_responses() -> None:
    with pytest.raises(OAuthError) as info:
        parse_par_response(answer({"error": "invalid_request", "error_description": "\x1b"}, 400))
    assert info.value.error == "invalid_request" and "\x1b" not in str(info.value)
    for raw, status in ((b"{}", 500), (b"<html>", 400), (b"\xff", 201), (b"[" * 100000, 201)):
        with pytest.raises(PushedAuthorizationError):
            parse_par_response(HttpResponse(status, (), raw))


def test_par_lifetime_is_bounded() -> None:
    assert parse_par_response(answer({"request_uri": "r", "expires_in": 1e9})).expires_in == 600
