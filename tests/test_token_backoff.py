"""A failing authorization server is not hammered: after a failed renewal the still-valid token
stays in use, and the next renewal waits (1 s, 2 s, 4 s … 60 s) instead of running per request."""

from __future__ import annotations

import time

from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.testing import ClientRegistration, LocalDPoPServers
from dpop_hsm.token import Token, TokenClient


def _servers() -> LocalDPoPServers:
    client = ClientRegistration("c", "client_secret_basic", "s")
    return LocalDPoPServers(clients=[client], as_nonce=False, token_lifetime=300)


def _due_client(servers: LocalDPoPServers) -> TokenClient:
    return TokenClient(
        SoftwareSigner.generate(),
        token_endpoint=servers.token_endpoint,
        client_id="c",
        client_secret="s",
        renew_before=299.5,  # due for renewal half a second after it is issued
    )


def test_failed_renewal_backs_off_while_the_token_is_valid() -> None:
    with _servers() as servers:
        tc = _due_client(servers)
        first = tc.get_token()
        time.sleep(0.6)
        servers.as_behavior = "error_500"
        before = servers.counters.token_requests
        for _ in range(50):
            assert tc.get_token() is first  # still valid: kept in use
        assert servers.counters.token_requests - before == 1  # one failed try, then backoff
        time.sleep(1.1)  # first backoff step is 1 s
        servers.as_behavior = "normal"
        renewed = tc.get_token()
        assert renewed is not first
        assert servers.counters.token_requests - before == 2


def test_a_cancelled_renewal_is_no_failure_and_a_late_token_never_replaces_a_newer_one() -> None:
    import asyncio
    import contextlib

    from dpop_hsm.token import Renewal

    with _servers() as servers:
        tc = _due_client(servers)
        first = tc.get_token()
        time.sleep(0.6)
        renewal = tc.acquire()
        assert isinstance(renewal, Renewal)
        with contextlib.suppress(asyncio.CancelledError), renewal:
            raise asyncio.CancelledError  # the awaiting task was cancelled: the AS never failed
        before = servers.counters.token_requests
        renewed = tc.get_token()  # no back-off: the next caller renews at once
        assert renewed is not first and servers.counters.token_requests == before + 1

        # A token fetched by a step whose caller had stopped waiting (it was inside the step
        # when the caller left) is kept only if nothing newer was cached meanwhile.
        import json

        from dpop_hsm.sansio import HttpResponse

        def issued(lifetime: int) -> Token:
            body = {"access_token": f"at-{lifetime}-xxxxxxxxxxxxxxxx", "expires_in": lifetime}
            body["token_type"] = "DPoP"
            answer = HttpResponse(200, (), json.dumps(body).encode())
            return tc.parse_response(answer, sent_monotonic=time.monotonic(), sent_wall=time.time())

        late, newer = issued(60), issued(300)
        tc.cache.put(tc.cache_key, newer)
        tc._adopt_late_token(late)
        assert tc.cache.get(tc.cache_key) is newer
        tc.cache.put(tc.cache_key, late)
        tc._adopt_late_token(newer)
        assert tc.cache.get(tc.cache_key) is newer
