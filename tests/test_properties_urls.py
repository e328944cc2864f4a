"""URL rules as properties: what the https/loopback gate accepts, the transport reads alike.

For any string, ``normalize_htu`` either refuses it with a ConfigurationError or accepts a URL
with no backslash, whitespace, control character or userinfo, whose host urllib3 (what
requests sends with) parses to the same host urllib does; and ``is_loopback_host`` is true only
for a loopback IP literal or ``localhost`` itself. Hostile shapes — ``\\@``, TAB/CR/LF, ``user@``
— are generated on purpose around real hosts.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

import pytest
import urllib3.util
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dpop_hsm.errors import ConfigurationError
from dpop_hsm.htu import is_loopback_host, normalize_htu, require_https

FAST = settings(deadline=2000, suppress_health_check=[HealthCheck.too_slow], max_examples=400)
HOSTS = ["127.0.0.1", "localhost", "evil.example", "[::1]", "api.localhost", "10.0.0.1"]
TRICKS = ["\\", "@", "\\@", "\t", "\r", "\n", " ", "\x00", "\x7f", "%40", "user:pw@", ":99", ""]


@st.composite
def hostile_urls(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["http", "https", "HTTP"]))
    first, second = draw(st.sampled_from(HOSTS)), draw(st.sampled_from(HOSTS))
    trick = draw(st.sampled_from(TRICKS))
    path = draw(st.sampled_from(["/token", "/a/../b", "/x?access_token=s3cr3t", ""]))
    shape = draw(st.integers(min_value=0, max_value=2))
    if shape == 0:
        return f"{scheme}://{first}{trick}{second}{path}"
    if shape == 1:
        return f"{scheme}://{trick}{first}{path}"
    return f"{scheme}://{first}{path}{trick}"


def accepted(url: str) -> bool:
    try:
        normalize_htu(url)
    except ConfigurationError:
        return False
    return True


@FAST
@given(st.one_of(hostile_urls(), st.text(max_size=80)))
def test_accepted_urls_are_read_alike_by_the_transport(url: str) -> None:
    if not accepted(url):
        assert not is_loopback_host(url)
        return
    assert not any(c <= " " or c in "\\\x7f" for c in url)
    assert "@" not in urlsplit(url).netloc
    assert (urlsplit(url).hostname or "").isascii()
    ours = (urlsplit(url).hostname or "").lower()
    try:
        theirs = (urllib3.util.parse_url(url).host or "").lower().strip("[]")
    except ValueError:
        return  # urllib3 refuses to send it at all
    assert theirs == ours


@FAST
@given(hostile_urls())
def test_loopback_means_a_literal_or_localhost_itself(url: str) -> None:
    if is_loopback_host(url):
        host = urlsplit(url).hostname or ""
        assert host == "localhost" or ipaddress.ip_address(host).is_loopback
        assert accepted(url)


@FAST
@given(hostile_urls())
def test_refusals_never_show_userinfo_or_secret_query_values(url: str) -> None:
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    try:
        require_https(url, "token_endpoint")
    except ConfigurationError as e:
        assert "s3cr3t" not in str(e)  # a secret query field, masked
        assert not password or f":{password}@" not in str(e)  # userinfo never shown


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.example\\@127.0.0.1:9/token",  # urllib: 127.0.0.1; urllib3: evil.example
        "http://127.0.0.1\t@evil.example/token",
        "http://localhost@evil.example/token",
    ],
)
def test_the_review_cases_are_refused_before_any_secret_is_sent(url: str) -> None:
    with pytest.raises(ConfigurationError):
        require_https(url, "token_endpoint")


# Path text a caller may write unencoded: anything but what ends a path (?, #), what is refused
# outright (whitespace, controls, backslash, lone surrogates) and "%" (an escape already).
PATH_TEXT = st.text(
    st.characters(
        blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), blacklist_characters="?#%\\"
    ),
    max_size=24,
)


def _wire_urls(url: str) -> dict[str, str]:
    """The URL each transport puts on the wire for ``url`` (requests, httpx, aiohttp's yarl)."""
    import requests

    httpx = pytest.importorskip("httpx")
    yarl = pytest.importorskip("yarl")
    prepared = requests.Request("GET", url).prepare().url
    assert prepared is not None
    return {"requests": prepared, "httpx": str(httpx.URL(url)), "yarl": str(yarl.URL(url))}


@FAST
@given(PATH_TEXT, PATH_TEXT)
def test_a_proof_from_an_unencoded_url_names_the_path_every_transport_sends(
    first: str, second: str
) -> None:
    from dpop_hsm.htu import comparable_htu

    path = f"/{first}/{second}"
    # Dot segments are another property (tests/test_htu.py); httpx also departs from RFC 3986
    # §5.2.4 on them ("//." becomes "/", not "//"), so they stay out of this one.
    assume(not {".", ".."} & set(path.split("/")))
    url = "https://api.example" + path
    ours = normalize_htu(url)
    for transport, wire in _wire_urls(url).items():
        # What a verifier compares (RFC 3986 §6.2.2): equal for every transport.
        assert comparable_htu(wire) == comparable_htu(ours), transport
        if not any(c in "|^[]" for c in first + second):
            # Where the transports agree, the htu is the wire path to the letter.
            assert normalize_htu(wire) == ours, transport
