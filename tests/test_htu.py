"""htu normalization matrix (RFC 9449 §4.2, §4.3; RFC 3986 §6.2.2, §6.2.3)."""

from __future__ import annotations

import pytest

from dpop_hsm.errors import ConfigurationError
from dpop_hsm.htu import comparable_htu, is_loopback_host, normalize_htu, origin_of


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # default ports dropped, others kept
        ("https://as.example:443/token", "https://as.example/token"),
        ("http://as.example:80/token", "http://as.example/token"),
        ("https://as.example:80/token", "https://as.example:80/token"),
        ("http://as.example:443/token", "http://as.example:443/token"),
        ("https://as.example:8443/token", "https://as.example:8443/token"),
        ("https://as.example:/token", "https://as.example/token"),  # empty port
        # case of scheme and host, never of the path
        ("HTTPS://AS.Example.COM/Token", "https://as.example.com/Token"),
        ("HtTp://LocalHost:8080/A/b", "http://localhost:8080/A/b"),
        # empty path -> "/"; trailing slash kept as sent
        ("https://as.example", "https://as.example/"),
        ("https://as.example:443", "https://as.example/"),
        ("https://as.example/token/", "https://as.example/token/"),
        # query and fragment dropped
        ("https://as.example/token?a=1&b=2", "https://as.example/token"),
        ("https://as.example/token#frag", "https://as.example/token"),
        ("https://as.example/token?a=1#frag", "https://as.example/token"),
        ("https://as.example?x=1", "https://as.example/"),
        # IPv6 literals keep their brackets
        ("https://[::1]:8443/r", "https://[::1]:8443/r"),
        ("https://[::1]:443/r", "https://[::1]/r"),
        ("http://[2001:DB8::1]/r", "http://[2001:db8::1]/r"),
        # percent-encoding left exactly as sent
        (
            "https://as.example/a%2Fb/%7euser/%e2%82%ac",
            "https://as.example/a%2Fb/%7euser/%e2%82%ac",
        ),
        # what no URI holds raw is encoded as every transport sends it (UTF-8, uppercase hex)
        ("https://as.example/items/{id}", "https://as.example/items/%7Bid%7D"),
        ("https://as.example/caf\u00e9/\u20ac", "https://as.example/caf%C3%A9/%E2%82%AC"),
        ('https://as.example/a"<>`b', "https://as.example/a%22%3C%3E%60b"),
        # ... but not what the transports disagree on: the adapters sign their own wire URL
        ("https://as.example/a|b^[c]", "https://as.example/a|b^[c]"),
        # dot segments removed (RFC 3986 §5.2.4), as urllib3 and httpx do before sending
        ("https://as.example/a/./b/../c", "https://as.example/a/c"),
        ("https://as.example/a/..", "https://as.example/"),
        ("https://as.example/../../x", "https://as.example/x"),
        ("https://as.example/a/.", "https://as.example/a/"),
        ("https://as.example/a..b/.c", "https://as.example/a..b/.c"),
        # the query is outside htu, also for the cache: paging does not change the result
        ("https://as.example/items?page=2", "https://as.example/items"),
    ],
)
def test_normalize_htu(url: str, expected: str) -> None:
    assert normalize_htu(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        # urllib sees host 127.0.0.1, urllib3 sends to evil.example: a parser differential
        "http://evil.example\\@127.0.0.1:9/token",
        "http://127.0.0.1\\x/token",
        "https://as.example/a\\b",
        # urllib deletes TAB/CR/LF silently; other parsers keep or reject them
        "https://as.example/a\tb",
        "https://as.ex\nample/t",
        "https://as.example/t\r",
        "https://as.example/a b",
        " https://as.example/t",
        "https://as.example/t\x00",
        "https://as.example/t\x7f",
        "https://as.example/t?q=a b",
        # userinfo: credentials never go in our URLs, and "@" disguises the real host
        "https://user:pw@as.example:8443/t",
        "https://user@as.example/t",
        "http://127.0.0.1@as.example.com/token",
        "http://as.example.com@127.0.0.1/token",
    ],
)
def test_normalize_htu_refuses_parser_differentials(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        normalize_htu(url)
    assert "pw" not in str(info.value)
    assert is_loopback_host(url) is False


def test_messages_never_show_userinfo_or_secret_query_fields() -> None:
    from dpop_hsm.htu import require_https

    for url in (
        "http://user:s3cr3t-pw@as.example.com/token",
        "http://as.example.com/token?access_token=s3cr3t-pw",
        "http://[::1/token?access_token=s3cr3t-pw",
    ):
        with pytest.raises(ConfigurationError) as info:
            require_https(url, "token_endpoint")
        assert "s3cr3t-pw" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://as.example/",
        "as.example/token",
        "/token",
        "https:///token",
        "https://as.example:99999/",
        "https://as.example:port/",
        "",
        "javascript:alert(1)",
        "https://as.example/a\ud800b",  # a lone surrogate: no transport can encode it
    ],
)
def test_normalize_htu_rejects(url: str) -> None:
    with pytest.raises(ConfigurationError):
        normalize_htu(url)


def test_normalize_htu_rejects_non_strings() -> None:
    with pytest.raises(ConfigurationError):
        normalize_htu(b"https://as.example/")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("https://as.example/a%7eb", "https://as.example/a~b"),  # unreserved decoded
        ("https://as.example/a%2fb", "https://as.example/a%2Fb"),  # hex case
        ("HTTPS://AS.EXAMPLE:443/x?q", "https://as.example/x"),
        ("https://as.example/%41", "https://as.example/A"),
        # dot segments, also percent-encoded ones (RFC 3986 §6.2.2.2 then §6.2.2.3)
        ("https://as.example/a/../b", "https://as.example/b"),
        ("https://as.example/a/%2E%2E/b", "https://as.example/b"),
        ("https://as.example/a/%2e/b", "https://as.example/a/b"),
        # httpx sends | ^ [ ] raw, requests and yarl encode them: the same request either way
        ("https://as.example/a|b^[c]", "https://as.example/a%7Cb%5E%5Bc%5D"),
        ("https://as.example/a|b", "https://as.example/a%7cb"),
        ("https://as.example/caf\u00e9", "https://as.example/caf%c3%a9"),
    ],
)
def test_comparable_htu_equal(a: str, b: str) -> None:
    assert comparable_htu(a) == comparable_htu(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("https://as.example/a%2Fb", "https://as.example/a/b"),  # reserved stays encoded
        ("https://as.example/token/", "https://as.example/token"),
        ("https://as.example/Token", "https://as.example/token"),
        ("http://as.example/token", "https://as.example/token"),
        ("https://as.example:8443/token", "https://as.example/token"),
        ("https://as.example/token", "https://evil.example/token"),
        ("https://as.example/a|b", "https://as.example/a/b"),
    ],
)
def test_comparable_htu_different(a: str, b: str) -> None:
    assert comparable_htu(a) != comparable_htu(b)


def test_origin_of() -> None:
    assert origin_of("HTTPS://As.Example:443/a/b?c#d") == "https://as.example"
    assert origin_of("http://127.0.0.1:8080/x") == "http://127.0.0.1:8080"
    assert origin_of("https://[::1]:8443/") == "https://[::1]:8443"


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:8080/", True),
        ("http://127.3.4.5/", True),
        ("http://localhost/", True),
        ("http://api.localhost/", False),  # *.localhost may be resolved through DNS
        ("http://localhost./", False),
        ("http://[::1]:80/", True),
        ("http://128.0.0.1/", False),
        ("http://127.0.0.1.evil.example/", False),
        ("http://example.com/", False),
        ("http://localhost.example.com/", False),
    ],
)
def test_is_loopback_host(url: str, loopback: bool) -> None:
    assert is_loopback_host(url) is loopback
