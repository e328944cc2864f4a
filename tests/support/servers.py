"""Fixtures for the token client, transports and the local AS/RS (``dpop_hsm.testing``).

``dpop_signer`` is parametrized over every registered signer kind. Other backends add theirs
from their own fixture module, at import time, by naming a fixture that returns a Signer::

    from tests.support.servers import register_dpop_signer
    register_dpop_signer("softhsm-es256", "softhsm_es256_signer")

Parametrization happens in ``pytest_generate_tests`` (after every plugin module is imported),
so registrations from any fixture module count. A fixture that needs absent hardware should
call ``tests.support.hardware.unavailable(...)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from dpop_hsm.signers.base import Signer
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.testing import ClientRegistration, LocalDPoPServers
from dpop_hsm.token import TokenClient

# A fixture value, not a credential: the local AS registers it for the tests' clients.
CLIENT_SECRET = "local-test-secret-5f0c"
AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt")

_SIGNER_FIXTURES: dict[str, str] = {
    "software-es256": "software_es256_signer",
    "software-ed25519": "software_ed25519_signer",
}


def register_dpop_signer(param_id: str, fixture_name: str) -> None:
    """Add a signer kind to the ``dpop_signer`` parametrization (call at import time)."""
    _SIGNER_FIXTURES[param_id] = fixture_name


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "dpop_signer" in metafunc.fixturenames:
        ids = list(_SIGNER_FIXTURES)
        metafunc.parametrize("dpop_signer", ids, ids=ids, indirect=True)


@pytest.fixture(scope="session")
def software_es256_signer() -> Signer:
    return SoftwareSigner.generate("ES256")


@pytest.fixture(scope="session")
def software_ed25519_signer() -> Signer:
    return SoftwareSigner.generate("EdDSA")


@pytest.fixture
def dpop_signer(request: pytest.FixtureRequest) -> Signer:
    """The DPoP key under test; ``software-es256`` when a test is not parametrized."""
    name = getattr(request, "param", "software-es256")
    signer: Signer = request.getfixturevalue(_SIGNER_FIXTURES[name])
    return signer


@pytest.fixture
def servers(dpop_signer: Signer) -> Iterator[LocalDPoPServers]:
    """A fresh AS + RS requiring nonces at both, with one client per auth method."""
    srv = LocalDPoPServers(
        clients=[
            ClientRegistration(
                "client-basic", auth_method="client_secret_basic", client_secret=CLIENT_SECRET
            ),
            ClientRegistration(
                "client-post", auth_method="client_secret_post", client_secret=CLIENT_SECRET
            ),
            ClientRegistration(
                "client-jwt", auth_method="private_key_jwt", jwk=dict(dpop_signer.public_jwk)
            ),
        ],
        as_nonce=True,
        rs_nonce=True,
    )
    with srv:
        yield srv


def token_client(
    servers: LocalDPoPServers,
    signer: Signer,
    auth_method: str = "client_secret_basic",
    **options: Any,
) -> TokenClient:
    """A TokenClient for one of the ``servers`` fixture's clients."""
    client_id = {
        "client_secret_basic": "client-basic",
        "client_secret_post": "client-post",
        "private_key_jwt": "client-jwt",
    }[auth_method]
    secret = CLIENT_SECRET if auth_method != "private_key_jwt" else None
    return TokenClient(
        signer,
        token_endpoint=servers.token_endpoint,
        client_id=client_id,
        client_secret=secret,
        auth_method=auth_method,  # type: ignore[arg-type]
        scope="api",
        **options,
    )
