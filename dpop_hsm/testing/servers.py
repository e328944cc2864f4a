"""``LocalDPoPServers``: the authorization server and the resource server, started together."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from ..errors import ConfigurationError
from ..verify import DEFAULT_ALGORITHMS
from .authorization_server import AuthorizationServer
from .browser import approve_device, complete_login
from .clients import (
    DEFAULT_CLIENT,
    DEFAULT_PUBLIC_CLIENT,
    ClientRegistration,
    validate_registration,
)
from .context import (
    AUTHORIZE_PATH,
    DEVICE_AUTHORIZATION_PATH,
    JWKS_PATH,
    METADATA_PATHS,
    PAR_PATH,
    REVOKE_PATH,
)
from .plumbing import ASBehavior, Counters, LoopbackServer, Nonces, RefreshPolicy, RSBehavior
from .resource_server import API_PATH, ResourceServer
from .tokens import TokenIssuer

__all__ = ["LocalDPoPServers"]


class LocalDPoPServers:
    """Start an AS and an RS on loopback; a context manager; see the package docstring.

    ``clients`` registers clients up front (more with :meth:`register_client`). Without it, the
    servers come with two ready clients: :data:`DEFAULT_CLIENT` (client_id ``dpop-hsm-test``,
    secret ``dpop-hsm-test-secret``, ``client_secret_basic``, scope ``api``, every grant) and
    :data:`DEFAULT_PUBLIC_CLIENT` (client_id ``dpop-hsm-public``, ``none``, scope ``api``:
    authorization code, refresh token and device grants, loopback redirect URIs
    ``http://127.0.0.1/callback`` and ``http://[::1]/callback`` on any port). So this works
    against a fresh ``LocalDPoPServers()`` (nonces included, the client retries)::

        TokenClient(signer, token_endpoint=servers.token_endpoint,
                    client_id=DEFAULT_CLIENT_ID, client_secret=DEFAULT_CLIENT_SECRET)

    Pass ``clients=[]`` for none.

    Options, all attributes a test may change while the servers run:
    ``as_nonce``/``rs_nonce`` require nonces (at the token endpoint, PAR and every grant; at the
    RS); ``token_lifetime`` (s, access tokens, at least 1); ``clock_offset`` (s added to the
    servers' clock: move time forward to expire codes, device codes and refresh tokens);
    ``required_scope`` (RS); ``dpop_signing_algs`` (accepted proof algs, advertised as
    ``dpop_signing_alg_values_supported``); ``require_par`` (RFC 9126 §5);
    ``refresh_tokens`` (``"always"`` for user grants, ``"offline_access"`` only when that
    scope was granted, ``"never"``); ``refresh_token_lifetime``, ``code_lifetime``,
    ``par_lifetime``, ``login_lifetime`` (the login form), ``device_code_lifetime`` (s);
    ``device_interval`` (s between polls); ``revoke_access_tokens`` (False: revocation answers
    ``unsupported_token_type`` for access tokens); ``metadata_overrides`` (merged into the
    metadata document, None deletes a member); ``as_behavior``/``rs_behavior`` (misbehave on
    purpose). ``counters`` counts what happened (see :class:`Counters`).
    """

    def __init__(
        self,
        *,
        clients: Iterable[ClientRegistration] | None = None,
        as_nonce: bool = True,
        rs_nonce: bool = True,
        nonce_lifetime: float = 30.0,
        token_lifetime: float = 300.0,
        clock_offset: float = 0.0,
        required_scope: str = "api",
        multi_challenge: bool = True,
        host: str = "127.0.0.1",
        as_port: int = 0,
        rs_port: int = 0,
        proof_max_age: float = 60.0,
        dpop_signing_algs: Collection[str] | None = None,
        require_par: bool = False,
        refresh_tokens: RefreshPolicy = "always",
        refresh_token_lifetime: float = 86400.0,
        code_lifetime: float = 60.0,
        par_lifetime: float = 60.0,
        login_lifetime: float = 600.0,
        device_code_lifetime: float = 600.0,
        device_interval: int = 5,
        revoke_access_tokens: bool = True,
        metadata_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        algs = frozenset(DEFAULT_ALGORITHMS if dpop_signing_algs is None else dpop_signing_algs)
        if not algs or not algs <= DEFAULT_ALGORITHMS:
            raise ConfigurationError(
                f"dpop_signing_algs must be a non-empty subset of {sorted(DEFAULT_ALGORITHMS)}"
            )
        if refresh_tokens not in ("always", "offline_access", "never"):
            raise ConfigurationError("refresh_tokens must be 'always', 'offline_access' or 'never'")
        self.as_nonce = as_nonce
        self.rs_nonce = rs_nonce
        self.as_nonces = Nonces(nonce_lifetime)
        self.rs_nonces = Nonces(nonce_lifetime)
        self.token_lifetime = token_lifetime
        self.clock_offset = clock_offset
        self.required_scope = required_scope
        self.multi_challenge = multi_challenge
        self.proof_max_age = proof_max_age
        self.dpop_signing_algs = algs
        self.require_par = require_par
        self.refresh_tokens: RefreshPolicy = refresh_tokens
        self.refresh_token_lifetime = refresh_token_lifetime
        self.code_lifetime = code_lifetime
        self.par_lifetime = par_lifetime
        self.login_lifetime = login_lifetime
        self.device_code_lifetime = device_code_lifetime
        self.device_interval = device_interval
        self.revoke_access_tokens = revoke_access_tokens
        self.metadata_overrides: dict[str, Any] = dict(metadata_overrides or {})
        self.as_behavior: ASBehavior = "normal"
        self.rs_behavior: RSBehavior = "normal"
        self.token_delay = 0.0
        self.issue_refresh_tokens = False
        self.refresh_tokens_issued: list[str] = []
        self.tokens_issued_at: list[float] = []
        self.counters = Counters()
        self.seen: deque[dict[str, Any]] = deque(maxlen=1000)
        self._issuer = TokenIssuer(now=self.now)
        self.kid = self._issuer.kid
        self.authorization_server = AuthorizationServer(
            self, counters=self.counters, issuer=self._issuer, nonces=self.as_nonces, seen=self.seen
        )
        self.resource_server = ResourceServer(
            self, counters=self.counters, issuer=self._issuer, nonces=self.rs_nonces, seen=self.seen
        )
        self.clients = self.authorization_server.clients
        defaults = (DEFAULT_CLIENT, DEFAULT_PUBLIC_CLIENT)
        for client in defaults if clients is None else clients:
            self.register_client(client)
        self._host, self._ports = host, (as_port, rs_port)
        self._servers: list[LoopbackServer] = []
        self._threads: list[threading.Thread] = []

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> LocalDPoPServers:
        """Bind both sockets and serve in daemon threads; a second call does nothing."""
        if self._servers:
            return self
        as_server = LoopbackServer(self.authorization_server, self._host, self._ports[0])
        try:
            rs_server = LoopbackServer(self.resource_server, self._host, self._ports[1])
        except OSError:
            as_server.server_close()
            raise
        self._servers = [as_server, rs_server]
        self.authorization_server.server = as_server
        self.resource_server.server = rs_server
        for server in self._servers:
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"dpop_hsm-{server.role}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop serving and close both sockets; the URLs are then unavailable."""
        # Shut both down in parallel: each shutdown() waits up to one poll interval.
        stoppers = [threading.Thread(target=server.shutdown) for server in self._servers]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        for server in self._servers:
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = [], []
        self.authorization_server.server = None
        self.resource_server.server = None

    def serve_forever(self) -> None:
        """Block until interrupted (Ctrl-C) — for ``dpop-hsm serve``."""
        self.start()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> LocalDPoPServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- endpoints ------------------------------------------------------------------------

    @property
    def as_url(self) -> str:
        """The authorization server's origin (and issuer); ConfigurationError when stopped."""
        return self.authorization_server.url

    @property
    def rs_url(self) -> str:
        """The resource server's origin; ConfigurationError when stopped."""
        return self.resource_server.url

    @property
    def token_endpoint(self) -> str:
        return self.authorization_server.token_endpoint

    @property
    def jwks_url(self) -> str:
        return self.as_url + JWKS_PATH

    @property
    def api_url(self) -> str:
        return self.rs_url + API_PATH

    @property
    def issuer(self) -> str:
        """The AS's issuer identifier (RFC 8414 §2): its origin, no trailing slash."""
        return self.as_url

    @property
    def metadata_url(self) -> str:
        """RFC 8414 §3 metadata URL (the document is also at the OpenID Connect path)."""
        return self.as_url + METADATA_PATHS[0]

    @property
    def authorization_endpoint(self) -> str:
        return self.as_url + AUTHORIZE_PATH

    @property
    def par_endpoint(self) -> str:
        return self.as_url + PAR_PATH

    @property
    def device_authorization_endpoint(self) -> str:
        return self.as_url + DEVICE_AUTHORIZATION_PATH

    @property
    def revocation_endpoint(self) -> str:
        return self.as_url + REVOKE_PATH

    def metadata(self) -> dict[str, Any]:
        """The metadata document the AS serves now (RFC 8414 §2)."""
        return self.authorization_server.metadata()

    def endpoints(self) -> str:
        """Printable summary for people (``dpop-hsm serve``)."""
        lines = [
            f"issuer         : {self.issuer}",
            f"metadata       : {self.metadata_url}",
            f"token endpoint : {self.token_endpoint}",
            f"authorize      : {self.authorization_endpoint}",
            f"par            : {self.par_endpoint}",
            f"device         : {self.device_authorization_endpoint}",
            f"revocation     : {self.revocation_endpoint}",
            f"jwks           : {self.jwks_url}",
            f"api            : {self.api_url}",
            f"nonces         : AS {'required' if self.as_nonce else 'off'}, "
            f"RS {'required' if self.rs_nonce else 'off'}",
            f"token lifetime : {self.token_lifetime:g} s",
        ]
        for c in self.clients.values():
            lines.append(f"client         : {c.client_id} ({c.auth_method}, scope {c.scope!r})")
        return "\n".join(lines)

    # --- a test acting as the user ----------------------------------------------------------

    def complete_login(
        self, authorization_url: str, *, user: str = "alice", approve: bool = True
    ) -> str:
        """Open ``authorization_url`` as the user's browser would, sign in as ``user`` and
        approve (or deny); the redirect ``Location`` (with ``code``/``error``, ``state``,
        ``iss``), not followed. Raises ProtocolError when the AS shows an error page."""
        return complete_login(authorization_url, user=user, approve=approve)

    def approve_device(self, user_code: str, *, user: str = "alice", approve: bool = True) -> None:
        """Enter ``user_code`` on the device page and approve (or deny) it, over HTTP.
        Raises ProtocolError for an unknown, expired or already decided code."""
        approve_device(self.as_url, user_code, user=user, approve=approve)

    # --- state ----------------------------------------------------------------------------

    def register_client(self, client: ClientRegistration) -> None:
        """Register (or replace) a client; ConfigurationError if it could never authenticate."""
        validate_registration(client)
        self.clients[client.client_id] = client

    def revoke_all(self) -> int:
        """Revoke every token issued so far (the RS then answers ``invalid_token``)."""
        return self._issuer.revoke_all()

    def now(self) -> float:
        """The servers' clock: ``time.time()`` plus ``clock_offset``."""
        return time.time() + self.clock_offset

    def public_jwk(self) -> dict[str, str]:
        """The access-token signing key as ``/jwks`` publishes it."""
        return self._issuer.public_jwk()

    def issue_token(self, *, client_id: str, jkt: str, scope: str) -> str:
        """A JWT access token bound to ``jkt`` (RFC 9449 §6.1), signed with the server key."""
        token, _ = self._issuer.issue(
            issuer=self.as_url,
            client_id=client_id,
            jkt=jkt,
            scope=scope,
            lifetime=self.token_lifetime,
        )
        return token
