"""Per-origin nonce store (RFC 9449 §8, §9) and the nonce-challenge predicate."""

from __future__ import annotations

import json
import threading

import pytest

from dpop_hsm.errors import ConfigurationError
from dpop_hsm.nonces import NonceStore, is_nonce_challenge, is_valid_nonce, nonce_from_headers


def test_nonces_are_per_origin_and_default_ports_collapse() -> None:
    store = NonceStore()
    store.observe("https://as.example.com:443/token", [("DPoP-Nonce", "n-as")])
    store.observe("https://rs.example.com/api", [("dpop-nonce", "n-rs")])  # HTTP/2 lowercase
    assert store.get("https://AS.example.com/other/path?q=1") == "n-as"
    assert store.get("https://rs.example.com:443/") == "n-rs"
    assert store.get("http://rs.example.com/") is None  # another scheme is another server
    assert store.get("https://rs.example.com:8443/") is None


def test_every_response_feeds_the_store_and_latest_wins() -> None:
    store = NonceStore()
    store.observe("https://rs.example.com/", [("DPoP-Nonce", "first")])
    store.observe("https://rs.example.com/", [("Content-Type", "application/json")])
    assert store.get("https://rs.example.com/") == "first"  # no header: keep the old one
    store.observe("https://rs.example.com/", [("DPoP-NONCE", "second")])
    assert store.get("https://rs.example.com/") == "second"


def test_two_nonce_fields_take_the_last_valid_one() -> None:
    headers = [("DPoP-Nonce", "one"), ("X", "y"), ("dpop-nonce", "two"), ("DPoP-Nonce", 'bad"')]
    assert nonce_from_headers(headers) == "two"


@pytest.mark.parametrize("value", ["", " ", 'a"b', "a\\b", "é", "a b", "x" * 2000])
def test_invalid_nonces_are_ignored(value: str) -> None:
    assert not is_valid_nonce(value)
    store = NonceStore()
    assert store.observe("https://rs.example.com/", [("DPoP-Nonce", value)]) in (
        None,
        value.strip(),
    )
    with pytest.raises(ConfigurationError):
        store.put("https://rs.example.com/", value)


def test_nqchar_allows_commas() -> None:
    assert is_valid_nonce("a,b!~#[]")


def test_store_is_bounded_lru() -> None:
    store = NonceStore(max_origins=3)
    for i in range(3):
        store.put(f"https://h{i}.example/", f"n{i}")
    assert store.get("https://h0.example/") == "n0"  # touch h0: h1 is now the oldest
    store.put("https://h3.example/", "n3")
    assert len(store) == 3
    assert store.get("https://h1.example/") is None
    assert store.get("https://h0.example/") == "n0"
    with pytest.raises(ConfigurationError):
        NonceStore(max_origins=0)


def test_store_is_thread_safe() -> None:
    store = NonceStore(max_origins=50)

    def work(t: int) -> None:
        for i in range(300):
            store.put(f"https://h{(t * 7 + i) % 80}.example/", f"n{t}-{i}")
            store.get(f"https://h{i % 80}.example/")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(store) == 50


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


def test_predicate_authorization_server() -> None:
    assert is_nonce_challenge(400, [], _json({"error": "use_dpop_nonce"}))
    assert not is_nonce_challenge(400, [], _json({"error": "invalid_dpop_proof"}))
    assert not is_nonce_challenge(400, [], b"not json")
    assert not is_nonce_challenge(500, [], _json({"error": "use_dpop_nonce"}))
    assert not is_nonce_challenge(200, [("DPoP-Nonce", "x")], b"{}")


def test_predicate_resource_server() -> None:
    header = 'Bearer realm="a, b", DPoP algs="ES256", error="use_dpop_nonce"'
    assert is_nonce_challenge(401, [("www-authenticate", header)])
    assert is_nonce_challenge(401, [("WWW-Authenticate", "Basic"), ("WWW-Authenticate", header)])
    assert not is_nonce_challenge(401, [("WWW-Authenticate", 'Bearer error="use_dpop_nonce"')])
    assert not is_nonce_challenge(401, [("WWW-Authenticate", 'DPoP error="invalid_token"')])
    assert not is_nonce_challenge(401, [("WWW-Authenticate", 'DPoP error="unterminated')])
    assert not is_nonce_challenge(403, [("WWW-Authenticate", header)])
