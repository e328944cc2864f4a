"""AS metadata discovery (RFC 8414, OIDC Discovery, RFC 9449 §5.1): URLs, validation, cache."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dpop_hsm.discovery import (
    MetadataCache,
    ServerMetadata,
    check_dpop_alg,
    discovery_flow,
    fetch_metadata,
    metadata_urls,
    parse_metadata,
    scopes_with_offline_access,
    validate_issuer,
)
from dpop_hsm.errors import (
    ConfigurationError,
    DiscoveryError,
    InsecureEndpointError,
    IssuerMismatchError,
    MetadataError,
    UnsupportedAlgorithmError,
)
from dpop_hsm.sansio import HttpRequest, HttpResponse

ISSUER = "https://as.example.com"


def doc(issuer: str = ISSUER, **members: Any) -> dict[str, Any]:
    base = {
        "issuer": issuer,
        "authorization_endpoint": issuer + "/authorize",
        "token_endpoint": issuer + "/token",
    }
    base.update(members)
    return {k: v for k, v in base.items() if v is not None}


def ok(document: Any) -> HttpResponse:
    return HttpResponse(200, (("Content-Type", "application/json"),), json.dumps(document).encode())


# --- URL construction ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("issuer", "oauth", "oidc"),
    [
        (
            "https://as.example.com",
            "https://as.example.com/.well-known/oauth-authorization-server",
            "https://as.example.com/.well-known/openid-configuration",
        ),
        (  # RFC 8414 §3.1: a terminating "/" is removed before inserting the well-known part
            "https://as.example.com/",
            "https://as.example.com/.well-known/oauth-authorization-server",
            "https://as.example.com/.well-known/openid-configuration",
        ),
        (  # RFC 8414 §3.1 example: the path goes after the well-known suffix
            "https://example.com/issuer1",
            "https://example.com/.well-known/oauth-authorization-server/issuer1",
            "https://example.com/issuer1/.well-known/openid-configuration",
        ),
        (
            "https://example.com:8443/realms/dev/",
            "https://example.com:8443/.well-known/oauth-authorization-server/realms/dev",
            "https://example.com:8443/realms/dev/.well-known/openid-configuration",
        ),
        (
            "http://127.0.0.1:9000/t",
            "http://127.0.0.1:9000/.well-known/oauth-authorization-server/t",
            "http://127.0.0.1:9000/t/.well-known/openid-configuration",
        ),
    ],
)
def test_metadata_urls(issuer: str, oauth: str, oidc: str) -> None:
    assert metadata_urls(issuer) == (oauth, oidc)


@pytest.mark.parametrize(
    "issuer",
    [
        "",
        "as.example.com",
        "ftp://as.example.com",
        "https://",
        "https://as.example.com?tenant=1",  # RFC 8414 §2: no query
        "https://as.example.com#frag",  # no fragment
        "https://user:pw@as.example.com",
        "https://as.example.com/\x00",
        "https://as.example.com/ a",
        "https://as.example.com:99999",
        "https://exämple.com",
        "https://" + "a" * 9000,
    ],
)
def test_bad_issuers_are_configuration_errors(issuer: str) -> None:
    with pytest.raises(ConfigurationError):
        validate_issuer(issuer)


def test_plain_http_issuer_only_for_loopback() -> None:
    with pytest.raises(InsecureEndpointError):
        validate_issuer("http://as.example.com")
    assert validate_issuer("http://127.0.0.1:8080") == "http://127.0.0.1:8080"


# --- validation --------------------------------------------------------------------------------


def test_parse_full_document() -> None:
    metadata = parse_metadata(
        ok(
            doc(
                pushed_authorization_request_endpoint=ISSUER + "/par",
                require_pushed_authorization_requests=True,
                device_authorization_endpoint=ISSUER + "/device",
                revocation_endpoint=ISSUER + "/revoke",
                scopes_supported=["openid", "offline_access"],
                code_challenge_methods_supported=["S256"],
                dpop_signing_alg_values_supported=["ES256", "EdDSA"],
                authorization_response_iss_parameter_supported=True,
                x_vendor={"nested": [1, 2]},
            )
        ),
        issuer=ISSUER,
    )
    assert metadata.pushed_authorization_request_endpoint == ISSUER + "/par"
    assert metadata.require_pushed_authorization_requests is True
    assert metadata.authorization_response_iss_parameter_supported is True
    assert metadata.scopes_supported == ("openid", "offline_access")
    assert metadata.raw["x_vendor"] == {"nested": [1, 2]}
    assert scopes_with_offline_access(["openid"], metadata) == ["openid", "offline_access"]
    assert scopes_with_offline_access(["offline_access"], metadata) == ["offline_access"]


def test_offline_access_only_when_listed() -> None:
    metadata = parse_metadata(ok(doc(scopes_supported=["openid"])), issuer=ISSUER)
    assert scopes_with_offline_access(["openid"], metadata) == ["openid"]
    bare = parse_metadata(ok(doc()), issuer=ISSUER)
    assert scopes_with_offline_access([], bare) == []


@pytest.mark.parametrize(
    "found",
    [
        "https://as.example.com/",  # trailing slash: RFC 8414 §3.3 is an exact comparison
        "https://AS.example.com",
        "https://as.example.com:443",
        "https://evil.example.com",
        "https://as.example.com.evil.example",
    ],
)
def test_issuer_must_match_exactly(found: str) -> None:
    with pytest.raises(IssuerMismatchError) as info:
        parse_metadata(ok(doc(issuer=found)), issuer=ISSUER)
    assert "RFC 8414 §3.3" in str(info.value)


@pytest.mark.parametrize(
    "member",
    [
        "token_endpoint",
        "authorization_endpoint",
        "pushed_authorization_request_endpoint",
        "device_authorization_endpoint",
        "revocation_endpoint",
        "jwks_uri",
    ],
)
@pytest.mark.parametrize(
    "url",
    [
        "http://as.example.com/x",  # plain http off loopback
        "http://127.0.0.1/x",  # an https issuer pointing at loopback: refused too
        "javascript:alert(1)",
        "https://user@as.example.com/x",
        "https://as.example.com/x#f",
        "https://as.example.com/\nx",
        "",
        42,
        ["https://as.example.com/x"],
    ],
)
def test_endpoints_must_pass_the_https_rule(member: str, url: Any) -> None:
    with pytest.raises(MetadataError) as info:
        parse_metadata(ok(doc(**{member: url})), issuer=ISSUER)
    assert member in str(info.value)


def test_loopback_issuer_may_use_loopback_http_endpoints() -> None:
    local = "http://127.0.0.1:8123"
    metadata = parse_metadata(ok(doc(issuer=local)), issuer=local)
    assert metadata.token_endpoint == local + "/token"
    with pytest.raises(MetadataError):  # but not a non-loopback http endpoint
        parse_metadata(ok(doc(issuer=local, token_endpoint="http://a.example/t")), issuer=local)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", MetadataError),
        (b"[]", MetadataError),
        (b"not json", MetadataError),
        (b'{"issuer":"https://as.example.com","issuer":"https://as.example.com"}', MetadataError),
        (b"\xef\xbb\xbf{}", MetadataError),
        (b'{"issuer": NaN}', MetadataError),
        (b"[" * 100000, MetadataError),
        (json.dumps({"issuer": ISSUER}).encode(), MetadataError),  # no token_endpoint
        (json.dumps({"token_endpoint": ISSUER + "/t"}).encode(), MetadataError),
        (b" " * (512 * 1024 + 1), MetadataError),
    ],
)
def test_hostile_bodies(body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_metadata(HttpResponse(200, (), body), issuer=ISSUER)


@pytest.mark.parametrize(
    "members",
    [
        {"scopes_supported": "openid"},
        {"scopes_supported": ["openid", 5]},
        {"dpop_signing_alg_values_supported": {"ES256": True}},
        {"require_pushed_authorization_requests": "true"},
        {"authorization_response_iss_parameter_supported": 1},
        {"code_challenge_methods_supported": ["plain"]},  # RFC 7636: we only do S256
        {"require_pushed_authorization_requests": True},  # ... but no PAR endpoint
        {"scopes_supported": ["x"] * 1001},
    ],
)
def test_bad_member_types(members: dict[str, Any]) -> None:
    with pytest.raises(MetadataError):
        parse_metadata(ok(doc(**members)), issuer=ISSUER)


def test_non_200_is_a_discovery_error() -> None:
    with pytest.raises(DiscoveryError):
        parse_metadata(HttpResponse(302, (("Location", "https://evil.example/"),)), issuer=ISSUER)


def test_dpop_alg_check() -> None:
    listed = parse_metadata(ok(doc(dpop_signing_alg_values_supported=["RS256"])), issuer=ISSUER)
    with pytest.raises(UnsupportedAlgorithmError) as info:
        check_dpop_alg(listed, "ES256")
    assert "ES256" in str(info.value) and "RS256" in str(info.value)
    assert isinstance(info.value, ConfigurationError)
    check_dpop_alg(listed, "RS256")
    # RFC 9449 §5.1: absent means "not said": try, and let the AS refuse.
    check_dpop_alg(parse_metadata(ok(doc()), issuer=ISSUER), "ES512")


def test_alg_error_sanitizes_hostile_alg_names() -> None:
    listed = parse_metadata(
        ok(doc(dpop_signing_alg_values_supported=["\x1b[31mRS256" + "x" * 500])), issuer=ISSUER
    )
    with pytest.raises(UnsupportedAlgorithmError) as info:
        check_dpop_alg(listed, "ES256")
    assert "\x1b" not in str(info.value) and len(str(info.value)) < 500


def test_from_endpoints_validates_like_a_document() -> None:
    metadata = ServerMetadata.from_endpoints(ISSUER, token_endpoint=ISSUER + "/t")
    assert metadata.token_endpoint == ISSUER + "/t" and metadata.authorization_endpoint is None
    with pytest.raises(MetadataError):
        ServerMetadata.from_endpoints(ISSUER, token_endpoint="http://as.example.com/t")


# --- the flow --------------------------------------------------------------------------------


def run(flow: Any, answers: dict[str, HttpResponse]) -> tuple[Any, list[HttpRequest]]:
    sent: list[HttpRequest] = []
    request = next(flow)
    while True:
        sent.append(request)
        response = answers.get(request.url, HttpResponse(404, ()))
        try:
            request = flow.send(response)
        except StopIteration as stop:
            return stop.value, sent


def test_flow_prefers_rfc8414_then_oidc() -> None:
    issuer = "https://example.com/tenant"
    oauth, oidc = metadata_urls(issuer)
    metadata, sent = run(discovery_flow(issuer), {oauth: ok(doc(issuer=issuer))})
    assert [r.url for r in sent] == [oauth] and metadata.issuer == issuer
    metadata, sent = run(discovery_flow(issuer), {oidc: ok(doc(issuer=issuer))})
    assert [r.url for r in sent] == [oauth, oidc] and metadata.issuer == issuer
    assert sent[0].method == "GET" and sent[0].header("Accept") == "application/json"


def test_flow_skips_a_mismatching_document_but_never_uses_it() -> None:
    issuer = "https://example.com/tenant"
    oauth, oidc = metadata_urls(issuer)
    # A server answering its root document for every path: the OIDC document is the right one.
    answers = {oauth: ok(doc(issuer="https://example.com")), oidc: ok(doc(issuer=issuer))}
    metadata, _ = run(discovery_flow(issuer), answers)
    assert metadata.issuer == issuer
    with pytest.raises(IssuerMismatchError):  # both wrong: the telling error wins over a 404
        run(discovery_flow(issuer), {oauth: ok(doc(issuer="https://example.com"))})


def test_flow_without_any_document() -> None:
    with pytest.raises(DiscoveryError) as info:
        run(discovery_flow(ISSUER), {})
    assert "HTTP 404" in str(info.value)


def test_fetch_metadata_caches_only_valid_documents() -> None:
    calls: list[str] = []
    document = ok(doc())

    def send(request: HttpRequest) -> HttpResponse:
        calls.append(request.url)
        return document if request.url.endswith("oauth-authorization-server") else ok([])

    cache = MetadataCache()
    first = fetch_metadata(ISSUER, send, cache=cache)
    assert fetch_metadata(ISSUER, send, cache=cache) is first and len(calls) == 1

    bad_calls: list[str] = []

    def bad(request: HttpRequest) -> HttpResponse:
        bad_calls.append(request.url)
        return ok(doc(issuer="https://evil.example"))

    with pytest.raises(IssuerMismatchError):
        fetch_metadata("https://other.example", bad, cache=cache)
    assert cache.get("https://other.example") is None and len(cache) == 1


def test_cache_is_bounded_in_size_and_time() -> None:
    now = [0.0]
    cache = MetadataCache(max_entries=2, ttl=10, clock=lambda: now[0])
    issuers = [f"https://as{i}.example" for i in range(3)]
    for issuer in issuers:
        cache.put(parse_metadata(ok(doc(issuer=issuer)), issuer=issuer))
    assert len(cache) == 2 and cache.get(issuers[0]) is None
    assert cache.get(issuers[2]) is not None
    now[0] = 10.0
    assert cache.get(issuers[2]) is None
    with pytest.raises(DiscoveryError):
        MetadataCache(max_entries=0)
    with pytest.raises(DiscoveryError):
        MetadataCache(ttl=0)
