"""The shared-cache core without Redis: the entry codec and its validation, degraded mode, and
the one-host file cache (fcntl locks) with real processes where a process must die."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Generator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from dpop_hsm.errors import ConfigurationError, TransportError
from dpop_hsm.file_cache import FileTokenCache
from dpop_hsm.jose import b64url_encode, compact_json
from dpop_hsm.sansio import HttpRequest, HttpResponse
from dpop_hsm.shared_cache import Outage, Unavailable, decode_entry, encode_entry, entry_id
from dpop_hsm.shared_entry import MAX_LIFETIME
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.testing import LocalDPoPServers
from dpop_hsm.token import CacheKey, Renewal, Token, TokenClient, drive_flow
from tests.support.caches import CACHE_CLIENT_SECRET, cache_client, cache_servers

SECRET = CACHE_CLIENT_SECRET
JKT = "x" * 43
KEY = CacheKey("https://as.example/token", "client", "api", ("https://rs.example",), JKT)


def _token(lifetime: float = 60.0, renew_before: float = 6.0, **fields: Any) -> Token:
    now = time.monotonic()
    values: dict[str, Any] = {
        "access_token": "opaque-token-value",
        "token_type": "DPoP",
        "expires_at": now + lifetime,
        "renew_at": now + lifetime - renew_before,
        "issued_at": time.time(),
        "lifetime": lifetime,
        "jkt": JKT,
        "scope": "api",
        "extra": MappingProxyType({"expires_in": lifetime}),
    }
    values.update(fields)
    return Token(**values)


def _jwt(claims: dict[str, Any]) -> str:
    header = b64url_encode(compact_json({"alg": "ES256", "typ": "at+jwt"}))
    return f"{header}.{b64url_encode(compact_json(claims))}.c2ln"


# --- the codec ------------------------------------------------------------------------------


def test_entry_round_trip_keeps_the_token_and_its_deadlines() -> None:
    token = _token(lifetime=60, renew_before=6)
    decoded = decode_entry(KEY, encode_entry(KEY, token))
    assert decoded is not None
    got = decoded.token
    assert (got.access_token, got.token_type, got.scope, got.jkt) == (
        token.access_token,
        "DPoP",
        "api",
        JKT,
    )
    assert abs(got.expires_at - token.expires_at) < 0.5
    assert abs(got.renew_at - token.renew_at) < 0.5
    assert dict(got.extra) == {"expires_in": 60}
    assert decoded.refresh_token is None


def test_the_store_clock_decides_the_remaining_lifetime() -> None:
    """Redis' PTTL, not the issuing host's clock: hosts whose clocks disagree still agree."""
    entry = json.loads(encode_entry(KEY, _token(lifetime=60)))
    entry["expires_at"] -= 3600  # the issuer's clock was an hour behind ours
    raw = json.dumps(entry).encode()
    assert decode_entry(KEY, raw) is None  # by wall clock it looks expired
    decoded = decode_entry(KEY, raw, remaining=30.0)
    assert decoded is not None
    assert 29 < decoded.token.expires_in() <= 30


def test_a_clock_stepped_back_cannot_stretch_a_token_past_its_lifetime() -> None:
    entry = json.loads(encode_entry(KEY, _token(lifetime=60)))
    entry["expires_at"] += 10_000
    decoded = decode_entry(KEY, json.dumps(entry).encode())
    assert decoded is not None
    assert decoded.token.expires_in() <= 60


def test_expired_entries_read_as_absent() -> None:
    entry = json.loads(encode_entry(KEY, _token()))
    entry["expires_at"] = time.time() - 1
    assert decode_entry(KEY, json.dumps(entry).encode()) is None


def _mutate(change: dict[str, Any]) -> bytes:
    # Long-lived: these are built at import time and must not expire before the test runs.
    entry = json.loads(encode_entry(KEY, _token(lifetime=86_400)))
    for name, value in change.items():
        if value is _DROP:
            entry.pop(name)
        else:
            entry[name] = value
    return json.dumps(entry).encode()


_DROP = object()
HOSTILE: dict[str, Any] = {
    "not JSON": b"\x00\x01garbage",
    "byte-order mark": b"\xef\xbb\xbf" + _mutate({}),
    "duplicate member": _mutate({})[:-1] + b', "token_type": "Bearer"}',
    "NaN lifetime": _mutate({}).replace(b'"lifetime": 86400', b'"lifetime": NaN'),
    "array": b"[1,2,3]",
    "other kind": _mutate({"kind": "someone.else"}),
    "newer version": _mutate({"v": 2}),
    "other client": _mutate({"key": [KEY.token_endpoint, "other", "api", list(KEY.resource), JKT]}),
    "other key in the cache key": _mutate(
        {"key": [KEY.token_endpoint, "client", "api", list(KEY.resource), "y" * 43]}
    ),
    "token bound to another key": _mutate({"access_token": _jwt({"cnf": {"jkt": "y" * 43}})}),
    "Bearer token": _mutate({"token_type": "Bearer"}),
    "token with a space": _mutate({"access_token": "two words"}),
    "token with a newline": _mutate({"access_token": "a\r\nInjected: 1"}),
    "empty token": _mutate({"access_token": ""}),
    "huge token": _mutate({"access_token": "a" * 20_000}),
    "no token": _mutate({"access_token": _DROP}),
    "zero lifetime": _mutate({"lifetime": 0}),
    "boolean lifetime": _mutate({"lifetime": True}),
    "string expiry": _mutate({"expires_at": "tomorrow"}),
    "renew_before beyond lifetime": _mutate({"renew_before": 1e9}),
    "secret in extra": _mutate({"extra": {"refresh_token": "leaked"}}),
    "extra not an object": _mutate({"extra": [1]}),
    "scope not a string": _mutate({"scope": 7}),
    "refresh token not a string": _mutate({"refresh_token": 5}),
    "too large": b"{" + b" " * 70_000 + b"}",
    "empty": b"",
    "deep nesting": b"[" * 30_000 + b"]" * 30_000,  # within MAX_ENTRY: the parser's limit
    "negative lifetime": _mutate({"lifetime": -60}),
    "float lifetime beyond any token's": _mutate({"lifetime": 1e12}),
    "string lifetime": _mutate({"lifetime": "60"}),
    "infinite expiry": _mutate({"expires_at": 12345.5}).replace(b"12345.5", b"1e999"),
    "boolean expiry": _mutate({"expires_at": True}),
    "negative renew_before": _mutate({"renew_before": -1}),
}


WHY = {
    "not JSON": "strict JSON",
    "byte-order mark": "byte-order mark",
    "duplicate member": "duplicate member",
    "NaN lifetime": "NaN",
    "array": "not a JSON object",
    "other kind": "not a dpop_hsm token entry",
    "newer version": "not a dpop_hsm token entry",
    "other client": "another cache key",
    "other key in the cache key": "another cache key",
    "token bound to another key": "cnf.jkt",
    "Bearer token": "not DPoP",
    "refresh token not a string": "refresh_token",
    "secret in extra": "non-secret",
    "extra not an object": "non-secret",
    "scope not a string": "scope",
    "zero lifetime": "out of range",
    "renew_before beyond lifetime": "out of range",
    "boolean lifetime": "lifetime is not a finite number",
    "string expiry": "expires_at is not a finite number",
    "too large": "too large",
    "empty": "empty",
    "deep nesting": "strict JSON",
    "negative lifetime": "out of range",
    "float lifetime beyond any token's": "out of range",
    "string lifetime": "lifetime is not a finite number",
    "infinite expiry": "strict JSON",
    "boolean expiry": "expires_at is not a finite number",
    "negative renew_before": "out of range",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_corrupt_or_foreign_entries_are_refused(name: str) -> None:
    with pytest.raises(ValueError) as caught:
        decode_entry(KEY, HOSTILE[name])
    message = str(caught.value)
    assert WHY.get(name, "header-safe") in message
    assert "leaked" not in message and "Injected" not in message


def test_a_jwt_bound_to_our_key_and_an_opaque_token_are_accepted() -> None:
    for access_token in (_jwt({"cnf": {"jkt": JKT}}), "opaque.two-dots-but.not-json!"):
        assert decode_entry(KEY, _mutate({"access_token": access_token})) is not None


def test_a_lifetime_beyond_max_lifetime_is_shared_as_max_lifetime() -> None:
    """What Redis' PX accepts and readers agree on: the entry says at most MAX_LIFETIME."""
    decade = 10 * 365 * 86400.0
    entry = json.loads(encode_entry(KEY, _token(lifetime=decade, renew_before=60)))
    assert entry["lifetime"] == MAX_LIFETIME and entry["renew_before"] == 60
    assert entry["expires_at"] <= time.time() + MAX_LIFETIME
    decoded = decode_entry(KEY, encode_entry(KEY, _token(lifetime=decade)))
    assert decoded is not None and decoded.token.expires_in() <= MAX_LIFETIME


def test_entries_are_ascii_whatever_the_token_response_held() -> None:
    """A store may tell foreign bytes from ours without parsing (the Redis read script does)."""
    raw = encode_entry(KEY, _token(scope="lecture écriture", extra=MappingProxyType({"n": "é"})))
    assert raw.isascii()
    decoded = decode_entry(KEY, raw)
    assert decoded is not None and decoded.token.scope == "lecture écriture"


def test_only_dpop_tokens_of_the_cache_key_are_shared() -> None:
    with pytest.raises(ValueError, match="DPoP"):
        encode_entry(KEY, _token(token_type="Bearer"))
    with pytest.raises(ValueError, match="another key"):
        encode_entry(KEY, _token(jkt="y" * 43))
    with pytest.raises(ValueError, match="expired"):
        encode_entry(KEY, _token(expires_at=time.monotonic() - 1))


def test_entries_hold_no_secret_response_members_and_a_refresh_token_only_when_given() -> None:
    token = _token(extra=MappingProxyType({"refresh_token": "rt-1", "id_token": "idt", "x": 1}))
    plain = encode_entry(KEY, token)
    assert b"rt-1" not in plain and b"idt" not in plain and b"refresh_token" not in plain
    opted = encode_entry(KEY, token, refresh_token="rt-2")
    decoded = decode_entry(KEY, opted, accept_refresh_token=True)
    assert decoded is not None and decoded.refresh_token == "rt-2"
    refused = decode_entry(KEY, opted)
    assert refused is not None and refused.refresh_token is None


def test_entry_names_are_fixed_length_and_differ_per_key() -> None:
    other = CacheKey(KEY.token_endpoint, KEY.client_id, "other", KEY.resource, JKT)
    assert len(entry_id(KEY)) == 64 and entry_id(KEY) != entry_id(other)
    assert "example" not in entry_id(KEY)


# --- degraded mode --------------------------------------------------------------------------


def test_an_outage_warns_once_skips_the_store_and_reports_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outage = Outage("test store", backoff=0.2)
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise ConnectionRefusedError("down")

    caplog.set_level(logging.INFO, logger="dpop_hsm")
    for _ in range(20):
        with pytest.raises(Unavailable):
            outage.call(broken, errors=(OSError,))
    assert len(calls) == 1 and outage.stats["skipped"] == 19  # skipped, not retried
    time.sleep(0.25)
    with pytest.raises(Unavailable):
        outage.call(broken, errors=(OSError,))  # the probe after the back-off fails again
    time.sleep(0.25)
    assert outage.call(lambda: 42, errors=(OSError,)) == 42
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "test store unavailable" in warnings[0].getMessage()
    assert any("sharing resumed" in r.getMessage() for r in caplog.records)
    assert outage.stats["outages"] == 1 and outage.stats["failures"] == 2


# --- the file cache -------------------------------------------------------------------------


@pytest.fixture
def servers() -> Any:
    with cache_servers(as_nonce=True, rs_nonce=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def signer() -> SoftwareSigner:
    return SoftwareSigner.generate("ES256")


_client = cache_client


def test_file_cache_shares_one_token_between_caches(
    tmp_path: Path, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    directory = tmp_path / "cache"
    first = _client(servers, signer, FileTokenCache(directory)).get_token()
    second = _client(servers, signer, FileTokenCache(directory)).get_token()
    assert second.access_token == first.access_token
    assert servers.counters.tokens_issued == 1
    assert directory.stat().st_mode & 0o777 == 0o700
    for path in directory.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600


def test_file_cache_tightens_a_loose_directory_and_refuses_a_symlink(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    FileTokenCache(loose)
    assert loose.stat().st_mode & 0o777 == 0o700
    (tmp_path / "link").symlink_to(loose)
    with pytest.raises(ConfigurationError, match="not a directory"):
        FileTokenCache(tmp_path / "link")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigurationError):
        FileTokenCache(tmp_path / "file")


@pytest.mark.parametrize("kind", ["garbage", "world-readable", "symlink"])
def test_file_cache_ignores_and_overwrites_untrusted_entry_files(
    tmp_path: Path,
    servers: LocalDPoPServers,
    signer: SoftwareSigner,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory = tmp_path / "cache"
    cache = FileTokenCache(directory)
    good = _client(servers, signer, cache)
    good.get_token()
    entry = directory / f"{entry_id(good.cache_key)}.json"
    raw = entry.read_bytes()
    if kind == "garbage":
        entry.write_bytes(b"\x00not json")
    elif kind == "world-readable":
        os.chmod(entry, 0o644)  # someone else could have written or read it
    else:
        target = tmp_path / "planted.json"
        target.write_bytes(raw)
        os.chmod(target, 0o600)
        entry.unlink()
        entry.symlink_to(target)
    other = _client(servers, signer, FileTokenCache(directory))
    other.get_token()
    assert servers.counters.tokens_issued == 2  # the entry was not trusted
    assert not entry.is_symlink() and entry.stat().st_mode & 0o777 == 0o600
    assert decode_entry(good.cache_key, entry.read_bytes()) is not None  # overwritten
    if kind == "garbage":
        assert any("corrupt or foreign" in r.getMessage() for r in caplog.records)


def test_file_lock_waiter_adopts_the_holders_token(
    tmp_path: Path, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    directory = tmp_path / "cache"
    holder_cache, waiter_cache = FileTokenCache(directory), FileTokenCache(directory)
    holder = _client(servers, signer, holder_cache)
    lock = holder_cache.lock(holder.cache_key, 5.0)
    assert lock.held
    got: list[Token] = []
    waiter = threading.Thread(
        target=lambda: got.append(_client(servers, signer, waiter_cache).get_token())
    )
    waiter.start()
    time.sleep(0.2)  # the waiter is now blocked on our lock
    assert not got
    fetched = drive_flow(holder.token_flow(), holder._default_sender())  # as a renewer would
    lock.publish(fetched)
    waiter.join(timeout=10)
    assert got and got[0].access_token == fetched.access_token
    assert servers.counters.tokens_issued == 1


def test_a_dead_file_lock_holder_costs_nothing(
    tmp_path: Path, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    directory = tmp_path / "cache"
    cache = FileTokenCache(directory, lease=30.0)
    client = _client(servers, signer, cache)
    lock_path = directory / f"{entry_id(client.cache_key)}.lock"
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock_path)!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        result: list[Token] = []
        waiter = threading.Thread(target=lambda: result.append(client.get_token()))
        waiter.start()
        time.sleep(0.2)
        assert not result  # blocked behind the live holder
        os.kill(holder.pid, signal.SIGKILL)
        waiter.join(timeout=10)  # the kernel dropped the lock: no lease to sit out
        assert result and servers.counters.tokens_issued == 1
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_file_cache_shares_nonces_so_a_new_process_needs_no_challenge(
    tmp_path: Path, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    directory = tmp_path / "cache"
    _client(servers, signer, FileTokenCache(directory, share_nonces=True)).get_token()
    assert servers.counters.as_nonce_challenges == 1
    newcomer = _client(servers, signer, FileTokenCache(directory, share_nonces=True))
    assert newcomer.nonces.get(servers.token_endpoint) is not None
    newcomer.invalidate()  # drops the shared token too: the next one is fetched
    newcomer.get_token()
    assert servers.counters.tokens_issued == 2
    assert servers.counters.as_nonce_challenges == 1


def test_file_cache_never_holds_the_refresh_token_client_secret_or_key(
    tmp_path: Path, servers: LocalDPoPServers
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    signer = SoftwareSigner.generate("ES256")
    servers.issue_refresh_tokens = True
    directory = tmp_path / "cache"
    _client(servers, signer, FileTokenCache(directory, share_nonces=True)).get_token()
    assert servers.refresh_tokens_issued
    blob = b"".join(p.read_bytes() for p in directory.iterdir() if p.suffix == ".json")
    pem = signer._key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key = signer._key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    d = key.private_numbers().private_value.to_bytes(32, "big")
    for secret in (SECRET.encode(), *(t.encode() for t in servers.refresh_tokens_issued)):
        assert secret not in blob
    assert b64url_encode(d).encode() not in blob and d not in blob and pem not in blob
    assert b"refresh_token" not in blob and b'"d"' not in blob


class _SlowReleaseCache(FileTokenCache):
    """A file cache whose renewal, when closed, waits for the test before it finishes: the
    close is then provably in progress while another thread touches the flow."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.closing = threading.Event()
        self.release = threading.Event()
        self.closes = 0

    def renewal_flow(
        self, client: TokenClient, previous: Token | None
    ) -> Generator[HttpRequest, HttpResponse, Token]:
        try:
            return (yield from super().renewal_flow(client, previous))
        finally:  # the fleet lock is released by now (yield from closed the inner flow)
            self.closes += 1
            self.closing.set()
            assert self.release.wait(10)


def test_a_renewal_abandoned_while_its_worker_resumes_is_closed_once(
    tmp_path: Path, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    """A cancelled async task leaves the Renewal block on the loop thread while a worker thread
    resumes its flow. Both closed the inner flow: the second close, during the first, raised
    ValueError('generator already executing') on one side instead of the TransportError."""
    cache = _SlowReleaseCache(tmp_path / "cache")
    client = _client(servers, signer, cache)
    renewal = client.acquire()
    assert isinstance(renewal, Renewal)
    flow = renewal.flow()
    request = next(flow)  # the fleet lock is held; the token request is ready
    response = client._default_sender()(request)
    errors: list[BaseException] = []

    def leave() -> None:  # the loop thread: the task was cancelled
        try:
            renewal.__exit__(None, None, None)
        except BaseException as e:  # whatever it is, the test reports it
            errors.append(e)

    leaver = threading.Thread(target=leave)
    leaver.start()
    try:
        assert cache.closing.wait(10), "__exit__ never closed the flow"
        # The worker resumes the flow while __exit__ is still closing it.
        with pytest.raises(TransportError, match="abandoned"):
            flow.send(response)
    finally:
        cache.release.set()
        leaver.join(timeout=10)
    assert not leaver.is_alive() and errors == []
    assert cache.closes == 1
    again = client.try_acquire()
    assert isinstance(again, Renewal), "the abandoned renewal kept the slot"
    with again:
        pass
    attempt = FileTokenCache(tmp_path / "cache").lock(client.cache_key, 1.0)
    assert attempt.held, "the abandoned renewal kept the fleet lock"
    attempt.release()
