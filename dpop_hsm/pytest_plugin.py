"""pytest fixtures for testing code that uses DPoP: real local servers and a software key.

Installed with dpop_hsm and loaded by pytest through the ``pytest11`` entry point ``dpop_hsm``
(disable it with ``-p no:dpop_hsm``). Loading it costs almost nothing: the servers and keys
are imported by the fixtures, when a test asks for them, and no optional extra (PKCS#11, TPM,
httpx) is imported at all.

``dpop_servers``
    A started :class:`dpop_hsm.testing.LocalDPoPServers` (authorization server + resource
    server on 127.0.0.1, nonces required at both), fresh for each test and stopped after it.
    It serves one ready client: ``DEFAULT_CLIENT_ID`` / ``DEFAULT_CLIENT_SECRET`` from
    :mod:`dpop_hsm.testing` (``dpop-hsm-test`` / ``dpop-hsm-test-secret``,
    ``client_secret_basic``, scope ``api``), and the public client ``DEFAULT_PUBLIC_CLIENT_ID``
    (``dpop-hsm-public``, for login flows); register more with ``register_client``.
``dpop_signer``
    A new software ES256 key (:class:`dpop_hsm.SoftwareSigner`) for each test.

A complete test::

    import requests

    from dpop_hsm import DPoPAuth, TokenClient
    from dpop_hsm.testing import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET


    def test_my_api_client(dpop_servers, dpop_signer):
        tokens = TokenClient(
            dpop_signer,
            token_endpoint=dpop_servers.token_endpoint,
            client_id=DEFAULT_CLIENT_ID,
            client_secret=DEFAULT_CLIENT_SECRET,
            scope="api",
        )
        response = requests.get(dpop_servers.api_url, auth=DPoPAuth(tokens), timeout=5)
        assert response.status_code == 200
        assert dpop_servers.counters.tokens_issued == 1
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .signers.software import SoftwareSigner
    from .testing import LocalDPoPServers

__all__ = ["dpop_servers", "dpop_signer"]


@pytest.fixture
def dpop_servers() -> Iterator[LocalDPoPServers]:
    """Started local AS + RS with the default client; stopped when the test ends."""
    from .testing import LocalDPoPServers

    with LocalDPoPServers() as servers:
        yield servers


@pytest.fixture
def dpop_signer() -> SoftwareSigner:
    """A fresh software ES256 DPoP key (never written anywhere)."""
    from .signers.software import SoftwareSigner

    return SoftwareSigner.generate("ES256")
