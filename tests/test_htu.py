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
        ("https://as.example/a b", "https://as.example/a b"),
        # userinfo dropped
        ("https://user:pw@as.example:8443/t", "https://as.example:8443/t"),
        ("https://user@as.example/t", "https://as.example/t"),
    ],
)
def test_normalize_htu(url: str, expected: str) -> None:
    assert normalize_htu(url) == expected


def test_normalize_htu_never_shows_userinfo() -> None:
    assert "pw" not in normalize_htu("https://user:pw@as.example/")


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
        ("http://api.localhost/", True),
        ("http://[::1]:80/", True),
        ("http://128.0.0.1/", False),
        ("http://127.0.0.1.evil.example/", False),
        ("http://example.com/", False),
        ("http://localhost.example.com/", False),
    ],
)
def test_is_loopback_host(url: str, loopback: bool) -> None:
    assert is_loopback_host(url) is loopback
