"""Drive the local authorization server's user flows with plain requests, as a client would.

Proofs come from a ProofFactory (the same key unless a test swaps it); the latest nonce from
any AS response is kept and used, with one retry on ``use_dpop_nonce`` like a real client.
The proofs' clock follows the servers' ``clock_offset`` so tests can move time forward.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import requests

from dpop_hsm.jose import b64url_encode
from dpop_hsm.proof import ProofFactory
from dpop_hsm.signers.base import Signer
from dpop_hsm.testing import LocalDPoPServers

REDIRECT_URI = "http://127.0.0.1:8765/callback"
# A fixture value, not a credential: the secret of the tests' confidential machine clients
# (RFC 6749 §4.4: client_credentials is for confidential clients only).
M2M_SECRET = "local-m2m-secret-9c1e"


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge), RFC 7636 §4.1-4.2."""
    verifier = b64url_encode(os.urandom(32))
    return verifier, b64url_encode(hashlib.sha256(verifier.encode()).digest())


def callback_params(location: str) -> dict[str, str]:
    """The query parameters of a redirect ``Location``, each exactly once."""
    parsed = parse_qs(urlsplit(location).query, keep_blank_values=True)
    assert all(len(v) == 1 for v in parsed.values()), location
    return {k: v[0] for k, v in parsed.items()}


@dataclass
class Flow:
    """One client of the local AS: its id, optional Basic secret, and its DPoP key."""

    servers: LocalDPoPServers
    signer: Signer
    client_id: str
    secret: str | None = None
    nonce: str | None = None
    verifier: str = ""
    challenge: str = ""
    redirect_uri: str = REDIRECT_URI
    sent: list[requests.Response] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.verifier, self.challenge = pkce_pair()

    def proof(self, url: str, *, signer: Signer | None = None, nonce: str | None = None) -> str:
        factory = ProofFactory(signer or self.signer, clock_offset=self.servers.clock_offset)
        return factory.create("POST", url, nonce=nonce if nonce is not None else self.nonce)

    def post(
        self,
        url: str,
        form: Mapping[str, str],
        *,
        proof: bool = True,
        signer: Signer | None = None,
        retry: bool = True,
        auth: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> requests.Response:
        """POST a form with client authentication (Basic, or client_id for a public client)
        and, if ``proof``, a DPoP proof; one retry on ``use_dpop_nonce``."""
        data = dict(form)
        basic = (self.client_id, self.secret) if auth and self.secret else None
        if auth and not self.secret:
            data.setdefault("client_id", self.client_id)
        for attempt in range(2):
            sent_headers = dict(headers or {})
            if proof:
                sent_headers["DPoP"] = self.proof(url, signer=signer)
            response = requests.post(url, data=data, headers=sent_headers, auth=basic, timeout=5)
            self.sent.append(response)
            if response.headers.get("DPoP-Nonce"):
                self.nonce = response.headers["DPoP-Nonce"]
            is_nonce = response.status_code == 400 and _error(response) == "use_dpop_nonce"
            if not (retry and is_nonce and attempt == 0):
                return response
        raise AssertionError("unreachable")

    def token(self, form: Mapping[str, str], **options: Any) -> requests.Response:
        return self.post(self.servers.token_endpoint, form, **options)

    def authorization_params(self, **overrides: str | None) -> dict[str, str]:
        params: dict[str, str | None] = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": "api",
            "state": b64url_encode(os.urandom(12)),
            "code_challenge": self.challenge,
            "code_challenge_method": "S256",
            "dpop_jkt": self.signer.thumbprint,
        }
        params.update(overrides)
        return {k: v for k, v in params.items() if v is not None}

    def authorization_url(self, **overrides: str | None) -> str:
        query = urlencode(self.authorization_params(**overrides))
        return f"{self.servers.authorization_endpoint}?{query}"

    def login(self, **overrides: str | None) -> dict[str, str]:
        """Authorize, sign in as alice, approve; the callback's parameters."""
        location = self.servers.complete_login(self.authorization_url(**overrides))
        assert location.startswith(self.redirect_uri + "?"), location
        return callback_params(location)

    def exchange(
        self, code: str, *, signer: Signer | None = None, **overrides: str | None
    ) -> requests.Response:
        form: dict[str, str | None] = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": self.verifier,
        }
        form.update(overrides)
        return self.token({k: v for k, v in form.items() if v is not None}, signer=signer)

    def tokens(self, **overrides: str | None) -> dict[str, Any]:
        """A full login: authorize, approve, redeem the code; the token response."""
        response = self.exchange(self.login(**overrides)["code"])
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def refresh(self, refresh_token: str, **options: Any) -> requests.Response:
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        form.update(options.pop("form", {}))
        return self.token(form, **options)


def _error(response: requests.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("error") if isinstance(body, dict) else None


def error_of(response: requests.Response) -> str | None:
    """The OAuth ``error`` of a JSON error response."""
    return _error(response)


def api(servers: LocalDPoPServers, signer: Signer, token: str) -> requests.Response:
    """GET the RS's API with the token and a proof (current RS nonce, servers' clock)."""
    factory = ProofFactory(signer, clock_offset=servers.clock_offset)
    nonce = servers.rs_nonces.current() if servers.rs_nonce else None
    proof = factory.create("GET", servers.api_url, access_token=token, nonce=nonce)
    return requests.get(
        servers.api_url, headers={"Authorization": f"DPoP {token}", "DPoP": proof}, timeout=5
    )


def claims_of(response: requests.Response) -> dict[str, str]:
    """The RS's echo of the token's claims."""
    return {c["type"]: c["value"] for c in response.json()}
