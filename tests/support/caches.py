"""The local servers and the TokenClient every token-cache suite uses (file, Redis, shared).

One registered client, ``c``, with a client secret the suites also look for in what the caches
store (it must never be there); short HTTP timeouts so a test that breaks fails fast.
"""

from __future__ import annotations

from typing import Any

from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.testing import ClientRegistration, LocalDPoPServers
from dpop_hsm.token import TokenClient

CACHE_CLIENT_SECRET = "cache-suite-secret-41c2"  # a fixture value the local AS registers


def cache_servers(**options: Any) -> LocalDPoPServers:
    """Local AS + RS (a context manager) that know the cache suites' client ``c``."""
    client = ClientRegistration("c", client_secret=CACHE_CLIENT_SECRET)
    return LocalDPoPServers(clients=[client], **options)


def cache_client(
    srv: LocalDPoPServers, signer: SoftwareSigner, cache: Any, **options: Any
) -> TokenClient:
    """A client of ``srv`` for ``c`` with ``cache``; ``options`` go to TokenClient."""
    options.setdefault("timeout", (2.0, 2.0))
    return TokenClient(
        signer,
        token_endpoint=srv.token_endpoint,
        client_id="c",
        client_secret=CACHE_CLIENT_SECRET,
        scope="api",
        cache=cache,
        **options,
    )
