"""A failing authorization server is not hammered: after a failed renewal the still-valid token
stays in use, and the next renewal waits (1 s, 2 s, 4 s … 60 s) instead of running per request."""

from __future__ import annotations

import time

from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.testing import ClientRegistration, LocalDPoPServers
from dpop_hsm.token import TokenClient


def test_failed_renewal_backs_off_while_the_token_is_valid() -> None:
    client = ClientRegistration("c", "client_secret_basic", "s")
    with LocalDPoPServers(clients=[client], as_nonce=False, token_lifetime=300) as servers:
        tc = TokenClient(
            SoftwareSigner.generate(),
            token_endpoint=servers.token_endpoint,
            client_id="c",
            client_secret="s",
            renew_before=299.5,  # due for renewal half a second after it is issued
        )
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
