"""Developer login with a hardware key: authorization code + PKCE (+ PAR), or the device grant.

:func:`login` runs one interactive login and returns a :class:`LoginSession` — a
``TokenClient`` whose access token is DPoP-bound to the signer's key and whose renewals use the
(key-bound) refresh token; with ``profile=`` the login is stored so that
:func:`load_profile` resumes it in a later process. :func:`logout` revokes and forgets it.

The browser flow, step by step (each step's rule in the module that implements it):

1. Metadata: discovered from the issuer (RFC 8414, then OIDC; issuer compared exactly) or
   given; the key's alg checked against ``dpop_signing_alg_values_supported`` (RFC 9449 §5.1).
2. A loopback listener on ``127.0.0.1`` (RFC 8252 §7.3) and a fresh state and PKCE verifier.
3. PAR (RFC 9126) whenever the AS advertises it, unless ``par=False`` (refused when the AS
   requires PAR): the request is pushed with client authentication and a DPoP proof (RFC 9449
   §10.1, nonce retry included), and the browser URL carries only ``client_id`` and
   ``request_uri``. Without PAR the URL carries every parameter and ``dpop_jkt`` (§10).
4. The URL goes to the user (``prompt``): the default opens the browser and also prints the
   URL on stderr, alone on a line.
5. The one redirect is checked (state, RFC 9207 ``iss``, ``error``) and the code is redeemed
   with the verifier and a proof from the same key.

The device flow (RFC 8628) asks the device authorization endpoint for a user code, shows the
verification URI, and polls the token endpoint with a fresh proof on every poll.

``offline_access`` is added to the scope when the AS lists it in ``scopes_supported`` (OpenID
Connect Core §11: OIDC providers issue refresh tokens only then).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .authorization import (
    authorization_params,
    authorization_url,
    new_authorization_request,
    new_state,
    parse_par_response,
    pushed_authorization_url,
)
from .client_auth import (
    ClientAuth,
    Form,
    client_auth_for,
)
from .device import DevicePoller, parse_device_authorization
from .discovery import (
    MetadataCache,
    ServerMetadata,
    check_dpop_alg,
    fetch_metadata,
    scopes_with_offline_access,
)
from .errors import (
    ConfigurationError,
    DPoPError,
    OAuthError,
    TransportError,
)
from .grants import AuthorizationCodeGrant, DeviceCodeGrant
from .login_prompt import LoginPrompt, TerminalPrompt
from .login_session import (
    LoginSession,
    LogoutResult,
    load_profile,
    logout,
    run_flow,
    warn_if_bearer,
)
from .loopback import LoopbackListener
from .nonces import NonceStore
from .profiles import Profile, ProfileStore, validate_key_reference, validate_profile_name
from .proof import ProofFactory
from .sansio import HttpRequest, HttpResponse, Sender
from .secret_sources import SecretSource
from .signers.base import Signer
from .token import DEFAULT_TIMEOUT, timeout_pair
from .token_endpoint import TokenEndpoint, TokenResponse

if TYPE_CHECKING:
    import requests as _requests

__all__ = [
    "DEFAULT_LOGIN_TIMEOUT",
    "LoginPrompt",
    "LoginSession",
    "LogoutResult",
    "TerminalPrompt",
    "load_profile",
    "login",
    "logout",
]

log = logging.getLogger("dpop_hsm.login")

DEFAULT_LOGIN_TIMEOUT = 300.0


def _requests_sender(
    session: _requests.Session | None,
    timeout: tuple[float, float],
    *,
    deadline: float | None = None,
) -> tuple[Sender, _requests.Session]:
    """A sender through ``session`` (a new one if None); each exchange ends within its
    ``timeout`` and, when given, by ``deadline`` (monotonic)."""
    import requests

    from ._requests_sender import send_http_request

    http = session if session is not None else requests.Session()

    def send(request: HttpRequest) -> HttpResponse:
        return send_http_request(http, request, timeout=timeout, deadline=deadline)

    return send, http


def _client_auth(
    *,
    auth_method: str | None,
    client_auth: ClientAuth | None,
    client_secret: SecretSource | None,
    assertion_signer: Signer,
    audience: str,
) -> ClientAuth:
    """RFC 8252 §8.5: a native app is a public client (``none``) unless it holds a secret."""
    if client_auth is not None:
        if auth_method is not None or client_secret is not None:
            raise ConfigurationError("give client_auth, or auth_method/client_secret, not both")
        return client_auth
    method = auth_method or ("client_secret_basic" if client_secret is not None else "none")
    return client_auth_for(
        method, client_secret=client_secret, assertion_signer=assertion_signer, audience=audience
    )


class _WithClientId(ClientAuth):
    """Client authentication that makes sure ``client_id`` is in the form exactly once.

    RFC 9126 §2.1: the pushed request carries the authorization request's parameters,
    ``client_id`` among them; ``none``, ``client_secret_post`` and ``private_key_jwt`` already
    put it in the body, ``client_secret_basic`` does not (RFC 6749 §3.1: never twice).
    """

    def __init__(self, inner: ClientAuth) -> None:
        self._inner = inner
        self.method = inner.method  # type: ignore[misc]

    def prepare(self, client_id: str) -> Callable[[Form], None]:
        stamp = self._inner.prepare(client_id)

        def with_id(form: Form) -> None:
            stamp(form)
            if not any(name == "client_id" for name, _ in form.pairs):
                form.pairs.append(("client_id", client_id))

        return with_id

    def __repr__(self) -> str:
        return repr(self._inner)


def _par_endpoint(endpoint: TokenEndpoint) -> TokenEndpoint:
    """The token endpoint's client, proofs and nonces, for posting to the PAR endpoint."""
    return TokenEndpoint(
        endpoint.url,
        client_id=endpoint.client_id,
        client_auth=_WithClientId(endpoint.client_auth),
        proofs=endpoint.proofs,
        nonces=endpoint.nonces,
    )


def _scope_list(scope: str | Sequence[str] | None) -> list[str]:
    if scope is None:
        return []
    if isinstance(scope, str):
        return scope.split()
    return [s for part in scope for s in part.split()]


def _authorize_in_browser(
    endpoint: TokenEndpoint,
    metadata: ServerMetadata,
    send: Sender,
    *,
    scope: str | None,
    resource: tuple[str, ...],
    par: bool | None,
    redirect_port: int,
    deadline: float,
    prompt: LoginPrompt,
    extra: Sequence[tuple[str, str]],
) -> TokenResponse:
    if metadata.authorization_endpoint is None:
        raise ConfigurationError(
            f"the authorization server {metadata.issuer!r} has no authorization_endpoint"
        )
    par_url = metadata.pushed_authorization_request_endpoint
    if par is False and metadata.require_pushed_authorization_requests:
        raise ConfigurationError(
            "the authorization server requires pushed authorization requests (RFC 9126 §5); "
            "PAR cannot be turned off for it"
        )
    use_par = par is not False and par_url is not None
    if par is True and par_url is None:
        raise ConfigurationError("PAR was asked for but the AS has no PAR endpoint")
    state = new_state()
    with LoopbackListener(
        state=state,
        issuer=metadata.issuer,
        iss_required=metadata.authorization_response_iss_parameter_supported,
        port=redirect_port,
    ) as listener:
        request = new_authorization_request(
            client_id=endpoint.client_id,
            redirect_uri=listener.redirect_uri,
            jkt=endpoint.proofs.thumbprint,
            scope=scope,
            resource=resource,
            extra=extra,
            state=state,
        )
        if use_par:
            assert par_url is not None
            # RFC 9126 §2.1 + RFC 9449 §10.1: client auth and a DPoP proof, nonce retry.
            exchange = run_flow(
                _par_endpoint(endpoint).post_form(
                    par_url,
                    [(k, v) for k, v in authorization_params(request) if k != "client_id"],
                    what="the PAR endpoint",
                ),
                send,
            )
            pushed = parse_par_response(exchange.response, secrets=exchange.secrets)
            url = pushed_authorization_url(
                metadata.authorization_endpoint, client_id=endpoint.client_id, pushed=pushed
            )
            log.info("pushed the authorization request (RFC 9126)")
        else:
            url = authorization_url(metadata.authorization_endpoint, request)
        prompt.show_authorization_url(url)
        answer = listener.wait(deadline - time.monotonic())
    grant = AuthorizationCodeGrant(
        code=answer.code,
        redirect_uri=request.redirect_uri,
        code_verifier=request.pkce.verifier,
        resource=resource,
        scope=scope,
    )
    # RFC 9449 §10: the code is bound to this key; the exchange carries its proof.
    response: TokenResponse = run_flow(endpoint.token_flow(grant), send)
    return response


def _authorize_on_device(
    endpoint: TokenEndpoint,
    metadata: ServerMetadata,
    send: Sender,
    *,
    scope: str | None,
    resource: tuple[str, ...],
    deadline: float,
    prompt: LoginPrompt,
    sleep: Callable[[float], None],
    min_interval: float,
) -> TokenResponse:
    url = metadata.device_authorization_endpoint
    if url is None:
        raise ConfigurationError(
            f"the authorization server {metadata.issuer!r} has no device_authorization_endpoint"
        )
    pairs: list[tuple[str, str]] = []
    if scope:
        pairs.append(("scope", scope))
    pairs += [("resource", r) for r in resource]
    # RFC 8628 §3.1: client authentication as at the token endpoint; no proof is defined here.
    exchange = run_flow(
        endpoint.post_form(url, pairs, dpop=False, what="the device authorization endpoint"),
        send,
    )
    authorization = parse_device_authorization(
        exchange.response, issuer=metadata.issuer, secrets=exchange.secrets
    )
    poller = DevicePoller(
        authorization,
        started=exchange.sent_monotonic,
        login_timeout=max(0.0, deadline - exchange.sent_monotonic),
        min_interval=min_interval,
    )
    prompt.show_device_code(authorization)
    grant = DeviceCodeGrant(authorization.device_code, scope=scope, resource=resource)
    while True:
        sleep(poller.next_wait())
        poller.polled()
        try:
            # RFC 9449 §5: a fresh proof (and nonce retry) on every poll.
            response: TokenResponse = run_flow(endpoint.token_flow(grant), send)
            return response
        except OAuthError as e:
            poller.on_error(e)
        except TransportError:
            poller.on_transport_error()


def login(
    signer: Signer | str,
    *,
    client_id: str,
    issuer: str | None = None,
    metadata: ServerMetadata | None = None,
    scope: str | Sequence[str] | None = None,
    resource: str | Sequence[str] | None = None,
    auth_method: str | None = None,
    client_secret: SecretSource | None = None,
    client_auth: ClientAuth | None = None,
    assertion_signer: Signer | None = None,
    device: bool = False,
    par: bool | None = None,
    redirect_port: int = 0,
    login_timeout: float = DEFAULT_LOGIN_TIMEOUT,
    prompt: LoginPrompt | None = None,
    profile: str | None = None,
    store: ProfileStore | None = None,
    key_reference: str | None = None,
    key_secret: SecretSource | None = None,
    client_secret_source: str | None = None,
    allow_bearer: bool = False,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
    session: _requests.Session | None = None,
    metadata_cache: MetadataCache | None = None,
    extra_authorization_params: Sequence[tuple[str, str]] = (),
    device_min_interval: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> LoginSession:
    """Log in interactively and return a :class:`LoginSession` bound to ``signer``'s key.

    ``signer`` is a Signer or a key reference (``pkcs11:…``, ``tpm2:…``, a path) that is loaded
    here (``key_secret``: its PIN/password source). ``issuer`` is discovered unless ``metadata``
    is given. The client is public (``none``, RFC 8252 §8.5) unless ``client_secret`` or
    ``auth_method``/``client_auth`` say otherwise; ``private_key_jwt`` assertions are signed by
    ``assertion_signer`` or the DPoP key itself. ``device=True`` uses the device grant instead
    of the browser; ``par`` None uses PAR whenever the AS offers it, False never (an error when
    the AS requires it). ``login_timeout`` bounds the wait for the user (in the device flow,
    every request after discovery too: a poll still unanswered then ends the login);
    ``timeout`` each HTTP request. ``profile`` stores the login (``key_reference`` is then
    required unless ``signer`` is a reference; ``client_secret_source`` may name a secret's
    ``env:``/``file:`` source, never the secret). ``allow_bearer`` accepts Bearer access tokens
    (only the refresh token is then bound to the key): an explicit, per-client opt-in that is
    logged.

    Raises :class:`ConfigurationError` subclasses (bad options,
    :class:`UnsupportedAlgorithmError`, :class:`LoopbackListenerError`, :class:`ProfileError`),
    :class:`DiscoveryError` subclasses, :class:`LoginError` subclasses (state/iss mismatch,
    ``error=`` on the redirect, timeout, device flow denied or expired), :class:`OAuthError`
    (the AS refused the code, e.g. a replayed code or a PKCE mismatch: ``invalid_grant``),
    :class:`TokenTypeError`, :class:`NonceError` and :class:`TransportError`.
    """
    if profile is not None:
        validate_profile_name(profile)
        # An unusable state directory (other users can reach it, not ours) is refused now,
        # before a PIN is asked for and the user logs in for tokens that have nowhere to go.
        store = store if store is not None else ProfileStore()
        store.names()
    owns_signer = isinstance(signer, str)
    if isinstance(signer, str):
        from .signers import load_signer

        key_reference = key_reference or signer
        if profile is not None:
            validate_key_reference(key_reference)  # before any PIN is asked for
        signer = load_signer(signer, secret=key_secret)
    elif profile is not None:
        if key_reference is None:
            raise ConfigurationError("storing a profile needs key_reference (how to load the key)")
        validate_key_reference(key_reference)
    if not login_timeout > 0:
        raise ConfigurationError("login_timeout must be positive")
    start = time.monotonic()
    deadline = start + login_timeout
    times = timeout_pair(timeout)
    send, http = _requests_sender(session, times)
    try:
        if metadata is None:
            if issuer is None:
                raise ConfigurationError("give issuer (to discover its metadata) or metadata")
            metadata = fetch_metadata(issuer, send, cache=metadata_cache)
        elif issuer is not None and issuer != metadata.issuer:
            raise ConfigurationError("issuer and metadata.issuer differ")
        check_dpop_alg(metadata, signer.alg)
        scopes = scopes_with_offline_access(_scope_list(scope), metadata)
        scope_text = " ".join(scopes) or None
        resources = (resource,) if isinstance(resource, str) else tuple(resource or ())
        auth = _client_auth(
            auth_method=auth_method,
            client_auth=client_auth,
            client_secret=client_secret,
            assertion_signer=assertion_signer or signer,
            audience=metadata.token_endpoint,
        )
        supported = metadata.token_endpoint_auth_methods_supported
        if supported is not None and auth.method not in supported:
            log.warning(
                "the authorization server does not list %s among its client authentication "
                "methods; trying it anyway",
                auth.method,
            )
        proofs = ProofFactory(signer)
        nonces = NonceStore()
        endpoint = TokenEndpoint(
            metadata.token_endpoint,
            client_id=client_id,
            client_auth=auth,
            proofs=proofs,
            nonces=nonces,
            allow_bearer=allow_bearer,
        )
        chosen = prompt if prompt is not None else TerminalPrompt()
        if device:
            # Every device request, polls included, ends by the login deadline: a poll the
            # AS holds open must not outlast login_timeout by its own HTTP timeout.
            bounded, _ = _requests_sender(http, times, deadline=deadline)
            response = _authorize_on_device(
                endpoint,
                metadata,
                bounded,
                scope=scope_text,
                resource=resources,
                deadline=deadline,
                prompt=chosen,
                sleep=sleep,
                min_interval=device_min_interval,
            )
        else:
            response = _authorize_in_browser(
                endpoint,
                metadata,
                send,
                scope=scope_text,
                resource=resources,
                par=par,
                redirect_port=redirect_port,
                deadline=deadline,
                prompt=chosen,
                extra=extra_authorization_params,
            )
    except BaseException:
        if owns_signer:
            _close(signer)
        raise
    token = response.token
    warn_if_bearer(client_id, token)
    if response.refresh_token is None:
        log.warning("the authorization server issued no refresh token: log in again on expiry")
    result = LoginSession(
        signer,
        metadata=metadata,
        client_id=client_id,
        client_auth=auth,
        refresh_token=response.refresh_token,
        token=token,
        scope=scope_text,
        resource=resources,
        allow_bearer=allow_bearer,
        profile=profile,
        store=store,
        timeout=times,
        nonce_store=nonces,
        proof_factory=proofs,
        session=http,
        owns_signer=owns_signer,
    )
    if profile is not None:
        assert key_reference is not None and result.store is not None
        _save_profile(
            result.store,
            profile,
            metadata=metadata,
            session=result,
            response=response,
            key_reference=key_reference,
            client_secret_source=client_secret_source,
        )
    return result


def _close(signer: Signer) -> None:
    closer = getattr(signer, "close", None)
    if callable(closer):
        try:
            closer()
        except DPoPError:
            log.debug("closing the signer failed", exc_info=True)


def _save_profile(
    store: ProfileStore,
    name: str,
    *,
    metadata: ServerMetadata,
    session: LoginSession,
    response: TokenResponse,
    key_reference: str,
    client_secret_source: str | None,
) -> None:
    token = response.token
    now = time.time()
    profile = Profile(
        name=name,
        issuer=metadata.issuer,
        metadata=metadata.to_document(),
        client_id=session.client_id,
        auth_method=session.auth_method,
        key=key_reference,
        jkt=session.signer.thumbprint,
        scope=session.scope,
        resource=session.resource,
        refresh_token=response.refresh_token,
        access_token=token.access_token,
        token_type=token.token_type,
        expires_at=now + token.expires_in(),
        allow_bearer=session.allow_bearer,
        client_secret_source=client_secret_source,
        created_at=now,
        updated_at=now,
    )
    store.save(profile)
