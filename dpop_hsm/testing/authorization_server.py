"""The local authorization server: routes each request to its endpoint.

- ``GET /.well-known/oauth-authorization-server`` and ``/.well-known/openid-configuration``:
  RFC 8414 metadata;
- ``GET|POST /authorize``, ``POST /authorize/approve``, ``POST /authorize/deny``, ``POST /par``,
  ``GET /device``, ``POST /device/approve``, ``POST /device/deny``: the front channel
  (:mod:`.authorize`);
- ``POST /connect/token``, ``POST /device_authorization``, ``POST /revoke``: the back channel
  (:mod:`.token_endpoint`);
- ``GET /jwks``: the access-token signing key; ``/echo``: which credential headers arrived.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..verify import DEFAULT_ALGORITHMS
from .authorize import FrontChannel
from .clients import AUTH_METHODS, GRANT_TYPES, ClientRegistration, allowed_scopes
from .context import (
    AUTHORIZE_PATH,
    DEVICE_AUTHORIZATION_PATH,
    DEVICE_PATH,
    JWKS_PATH,
    METADATA_PATHS,
    PAR_PATH,
    REVOKE_PATH,
    TOKEN_PATH,
    ASContext,
)
from .plumbing import (
    JSON_HEADERS,
    Handler,
    LoopbackServer,
    json_bytes,
)
from .role import ServerRole
from .token_endpoint import TokenEndpoint

__all__ = ["TOKEN_PATH", "AuthorizationServer"]

Route = Callable[[Handler, bytes], None]


class AuthorizationServer(ServerRole):
    """Answers the AS's requests; state shared with the RS comes from :class:`ServerRole`."""

    role = "as"

    def _setup(self) -> None:
        self.clients: dict[str, ClientRegistration] = {}
        self.ctx = ASContext(
            self.settings,
            counters=self.counters,
            issuer=self.issuer,
            nonces=self.nonces,
            clients=self.clients,
        )
        self.metadata_paths = set(METADATA_PATHS)
        front, back = FrontChannel(self.ctx), TokenEndpoint(self.ctx)
        self._post: dict[str, Route] = {
            TOKEN_PATH: back.token,
            PAR_PATH: front.par,
            DEVICE_AUTHORIZATION_PATH: back.device_authorization,
            REVOKE_PATH: back.revoke,
            AUTHORIZE_PATH: front.authorize,
            AUTHORIZE_PATH + "/approve": lambda h, b: front.decide(h, b, approve=True),
            AUTHORIZE_PATH + "/deny": lambda h, b: front.decide(h, b, approve=False),
            DEVICE_PATH + "/approve": lambda h, b: front.device_decide(h, b, approve=True),
            DEVICE_PATH + "/deny": lambda h, b: front.device_decide(h, b, approve=False),
        }
        self._get: dict[str, Route] = {
            AUTHORIZE_PATH: front.authorize,
            DEVICE_PATH: lambda h, b: front.device_form(h),
            JWKS_PATH: lambda h, b: h.send(
                200, json_bytes({"keys": [self.issuer.public_jwk()]}), JSON_HEADERS
            ),
        }

    @property
    def server(self) -> LoopbackServer | None:
        return self.ctx.server

    @server.setter
    def server(self, server: LoopbackServer | None) -> None:
        self.ctx.server = server

    @property
    def url(self) -> str:
        """The issuer: ``http://host:port`` of the bound socket."""
        return self.ctx.url

    @property
    def token_endpoint(self) -> str:
        return self.url + TOKEN_PATH

    def metadata(self) -> dict[str, Any]:
        """RFC 8414 §2 metadata, with ``settings.metadata_overrides`` applied (None deletes)."""
        url, algs = self.url, sorted(self.settings.dpop_signing_algs)
        scopes = {"offline_access"}
        for client in self.clients.values():
            scopes |= allowed_scopes(client)
        document: dict[str, Any] = {
            "issuer": url,
            "authorization_endpoint": url + AUTHORIZE_PATH,
            "token_endpoint": url + TOKEN_PATH,
            "jwks_uri": url + JWKS_PATH,
            "pushed_authorization_request_endpoint": url + PAR_PATH,
            "require_pushed_authorization_requests": self.settings.require_par,
            "device_authorization_endpoint": url + DEVICE_AUTHORIZATION_PATH,
            "revocation_endpoint": url + REVOKE_PATH,
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": list(GRANT_TYPES),
            "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
            "token_endpoint_auth_signing_alg_values_supported": sorted(DEFAULT_ALGORITHMS),
            "revocation_endpoint_auth_methods_supported": list(AUTH_METHODS),
            "code_challenge_methods_supported": ["S256"],  # RFC 7636 §4.2: plain refused
            "dpop_signing_alg_values_supported": algs,  # RFC 9449 §5.1
            "authorization_response_iss_parameter_supported": True,  # RFC 9207 §3
            "scopes_supported": sorted(scopes),
        }
        for key, value in self.settings.metadata_overrides.items():
            if value is None:
                document.pop(key, None)
            else:
                document[key] = value
        return document

    def handle(self, h: Handler, body: bytes) -> None:
        path = self.record(h)
        if path == "/echo":
            out = {k: self.seen[-1][k] for k in ("authorization", "dpop")}
            h.send(200, json_bytes(out), JSON_HEADERS)
            return
        if path in self.metadata_paths and h.command == "GET":
            h.send(200, json_bytes(self.metadata()), JSON_HEADERS)
            return
        routes = self._post if h.command == "POST" else self._get if h.command == "GET" else {}
        route = routes.get(path)
        if route is not None:
            route(h, body)
            return
        allowed = [m for m, table in (("GET", self._get), ("POST", self._post)) if path in table]
        if allowed:
            h.send(405, b"", [("Allow", ", ".join(allowed))])
            return
        h.send(404, b"not found", [("Content-Type", "text/plain")])
