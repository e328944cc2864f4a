"""A real local authorization server and resource server that enforce RFC 9449.

For tests (ours and users'), the demo and ``dpop-hsm serve``: two stdlib
``ThreadingHTTPServer`` instances on 127.0.0.1 (port 0 by default), real sockets, proofs checked
with :func:`dpop_hsm.verify.verify_proof`. Not a production server: no TLS, in-memory state.

Authorization server (``as_url``, also the issuer):
  RFC 8414 metadata at ``/.well-known/oauth-authorization-server`` and
  ``/.well-known/openid-configuration``. ``POST /connect/token`` with client_credentials,
  authorization_code (PKCE S256 only, code single use and bound to ``dpop_jkt``),
  refresh_token (rotated; bound to the DPoP key for public clients) and the device code grant
  (RFC 8628), client_secret_basic, client_secret_post, private_key_jwt (RFC 7523, registered
  public JWK, assertion jti replay-checked) or none; a DPoP proof is required (§5) and, when
  ``as_nonce``, a current nonce (§8: 400 ``use_dpop_nonce``), at PAR too. ``/authorize`` with a
  login + consent page a test completes over HTTP (``complete_login``), ``/par`` (RFC 9126),
  ``/device_authorization`` + ``/device`` (``approve_device``), ``/revoke`` (RFC 7009). Issues
  JWT access tokens (``typ: at+jwt``) signed with the server's own ES256 key, with
  ``cnf.jkt``, ``client_id``, ``scope``, ``exp`` (and ``sub``, the user, for user grants).
  ``GET /jwks`` publishes the key; ``GET /echo`` reports which credential headers arrived.
  Requests are read strictly: one ``application/x-www-form-urlencoded`` body, each parameter
  once (``resource`` may repeat, RFC 8707 §2), an empty one counts as omitted (RFC 6749 §3.1),
  one client authentication method per request (§2.3), client_credentials for confidential
  clients only (§4.4); a body that stops arriving for ``body_timeout`` seconds gets 408.
Resource server (``rs_url``):
  ``/api/dpop/test`` (and every path below it) returns the token's claims (never the
  proof); rejects Bearer use of a bound token, replays, wrong htm/htu/ath, a key that does
  not match ``cnf.jkt``, and (``rs_nonce``) a missing/stale nonce, each with
  ``WWW-Authenticate: DPoP error="…"`` and ``algs`` (§7.1, §9). ``/redirect?to=…`` answers
  307.

``LocalDPoPServers()`` with no ``clients`` serves two ready clients: ``DEFAULT_CLIENT``
(client_id ``dpop-hsm-test``, secret ``dpop-hsm-test-secret``, ``client_secret_basic``, scope
``api``, every grant) and ``DEFAULT_PUBLIC_CLIENT`` (``dpop-hsm-public``, ``none``, for login
flows). The pytest plugin :mod:`dpop_hsm.pytest_plugin` starts one per test.

Nonces rotate every ``nonce_lifetime`` seconds (the previous one stays acceptable) and are sent
on every response, 200s included. Counters are thread-safe; ``behavior`` knobs make the AS and
RS misbehave on purpose for failure tests.

Layout: :mod:`.plumbing` (HTTP server, bounded bodies, JSON, counters, nonces),
:mod:`.clients` (registrations, redirect URIs, client authentication), :mod:`.tokens` (access
tokens), :mod:`.grants` (codes, refresh tokens, device codes), :mod:`.context`,
:mod:`.authorize` (front channel), :mod:`.token_endpoint` (grants, device, revocation),
:mod:`.pages`, :mod:`.browser` (a test acting as the user), :mod:`.authorization_server`,
:mod:`.resource_server`, :mod:`.servers` (both, started together).
"""

from __future__ import annotations

from .clients import (
    DEFAULT_CLIENT,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_PUBLIC_CLIENT,
    DEFAULT_PUBLIC_CLIENT_ID,
    DEFAULT_REDIRECT_URIS,
    DEVICE_CODE_GRANT,
    ClientRegistration,
)
from .plumbing import MAX_BODY, ASBehavior, Counters, RefreshPolicy, RSBehavior
from .servers import LocalDPoPServers

__all__ = [
    "DEFAULT_CLIENT",
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "DEFAULT_PUBLIC_CLIENT",
    "DEFAULT_PUBLIC_CLIENT_ID",
    "DEFAULT_REDIRECT_URIS",
    "DEVICE_CODE_GRANT",
    "MAX_BODY",
    "ASBehavior",
    "ClientRegistration",
    "Counters",
    "LocalDPoPServers",
    "RSBehavior",
    "RefreshPolicy",
]
