"""The front channel of the local authorization server: the authorization endpoint with its
login + consent step, pushed authorization requests, and the device verification page.

- ``GET|POST /authorize`` (RFC 6749 §4.1.1, RFC 7636, RFC 9449 §10, RFC 9126 §4): validates
  the request and answers a login page holding a one-time ``form_token``.
- ``POST /authorize/approve`` (``form_token``, ``user``) → 302 to the redirect URI with
  ``code``, ``state`` and ``iss`` (RFC 9207); ``POST /authorize/deny`` (``form_token``) → 302
  with ``error=access_denied``.
- ``POST /par`` (RFC 9126 §2): the same parameters, client authentication, optional DPoP proof
  (RFC 9449 §10.1) → 201 ``request_uri`` + ``expires_in``.
- ``GET /device`` shows the device form; ``POST /device/approve`` (``user_code``, ``user``) and
  ``POST /device/deny`` (``user_code``) decide a device authorization (RFC 8628 §3.3).

Errors about the client or the redirect URI are shown on a page and never redirected: the AS
cannot trust the redirect URI then (RFC 6749 §4.1.2.1). Every other error is redirected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlencode, urlsplit, urlunsplit

from .clients import ClientRegistration, allowed_scopes, redirect_uri_matches
from .context import PAR_PATH, ASContext, parse_pairs
from .grants import AuthorizationRequest
from .pages import PAGE_HEADERS, device_page, login_page, message_page
from .plumbing import Handler, Reject

__all__ = ["FrontChannel"]

_B64URL_43 = re.compile(r"[A-Za-z0-9_-]{43}")  # a base64url SHA-256 digest (RFC 7636 §4.2)
_USER = re.compile(r"[^\x00-\x1f\x7f]{1,64}")
MAX_STATE = 1024


class AuthorizationError(Exception):
    """A refused authorization request; ``redirect_uri`` set when the error may go there."""

    def __init__(
        self,
        error: str,
        description: str,
        *,
        redirect_uri: str | None = None,
        state: str | None = None,
    ) -> None:
        super().__init__(error)
        self.error = error
        self.description = description
        self.redirect_uri = redirect_uri
        self.state = state


def with_params(uri: str, params: Mapping[str, str]) -> str:
    """``uri`` with ``params`` added to its query, which is kept (RFC 6749 §3.1.2)."""
    parts = urlsplit(uri)
    extra = urlencode(params)
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


class FrontChannel:
    """The endpoints a browser (or a test acting as one) talks to."""

    def __init__(self, ctx: ASContext) -> None:
        self.ctx = ctx

    # --- validation shared by /authorize and /par -------------------------------------------

    def _client_and_redirect(self, params: Mapping[str, str]) -> tuple[ClientRegistration, str]:
        client = self.ctx.clients.get(params.get("client_id", ""))
        if client is None:
            raise AuthorizationError("invalid_request", "unknown client_id")
        redirect_uri = params.get("redirect_uri")
        # Required here although RFC 6749 §3.1.2.3 lets a client with one registered URI
        # omit it: a native app's loopback port differs per run (RFC 8252 §7.3).
        if not redirect_uri:
            raise AuthorizationError("invalid_request", "redirect_uri is required")
        if not any(redirect_uri_matches(r, redirect_uri) for r in client.redirect_uris):
            raise AuthorizationError("invalid_request", "redirect_uri is not registered")
        return client, redirect_uri

    def _request(
        self,
        params: Mapping[str, str],
        client: ClientRegistration,
        redirect_uri: str,
        *,
        proof_jkt: str | None = None,
    ) -> AuthorizationRequest:
        state = params.get("state")

        def fail(error: str, description: str) -> AuthorizationError:
            return AuthorizationError(error, description, redirect_uri=redirect_uri, state=state)

        if state is not None and len(state) > MAX_STATE:
            raise fail("invalid_request", "state is too long")
        response_type = params.get("response_type")
        if not response_type:
            raise fail("invalid_request", "response_type is required")
        if response_type != "code":
            raise fail("unsupported_response_type", "only response_type=code")
        if params.get("response_mode", "query") != "query":
            raise fail("invalid_request", "only response_mode=query")
        if not client.allows("authorization_code"):
            raise fail("unauthorized_client", "client may not use the authorization code grant")
        scope = params.get("scope") or client.scope
        if not set(scope.split()) <= allowed_scopes(client):
            raise fail("invalid_scope", "scope not allowed for this client")
        # RFC 7636 §4.3: no method means "plain", which this server refuses (S256 only).
        if params.get("code_challenge_method") != "S256":
            raise fail("invalid_request", "PKCE with code_challenge_method=S256 is required")
        challenge = params.get("code_challenge", "")
        if not _B64URL_43.fullmatch(challenge):
            raise fail("invalid_request", "code_challenge must be a base64url SHA-256 digest")
        dpop_jkt = params.get("dpop_jkt")
        if dpop_jkt is not None and not _B64URL_43.fullmatch(dpop_jkt):
            raise fail("invalid_request", "dpop_jkt must be a base64url SHA-256 thumbprint")
        if proof_jkt is not None:
            # RFC 9449 §10.1: a proof at the PAR endpoint binds like dpop_jkt; both must agree.
            if dpop_jkt is not None and dpop_jkt != proof_jkt:
                raise fail("invalid_request", "dpop_jkt does not match the DPoP proof's key")
            dpop_jkt = proof_jkt
        return AuthorizationRequest(
            client_id=client.client_id,
            redirect_uri=redirect_uri,
            scope=" ".join(scope.split()),
            state=state,
            code_challenge=challenge,
            dpop_jkt=dpop_jkt,
        )

    # --- /authorize -------------------------------------------------------------------------

    def _params(self, h: Handler, body: bytes) -> dict[str, str]:
        if h.command == "POST":  # RFC 6749 §3.1: the AS MAY support POST
            return self.ctx.form(h, body)
        return parse_pairs(urlsplit(h.path).query)

    def authorize(self, h: Handler, body: bytes) -> None:
        ctx = self.ctx
        now = ctx.settings.now()
        try:
            try:
                params = self._params(h, body)
            except Reject as e:
                raise AuthorizationError("invalid_request", e.description) from e
            if "request_uri" in params:
                # RFC 9126 §4: the pushed request stands for all parameters but client_id.
                pushed = ctx.store.pull(params["request_uri"], params.get("client_id", ""), now)
                if pushed is None or pushed.client_id not in ctx.clients:
                    raise AuthorizationError(
                        "invalid_request_uri", "request_uri unknown, used, expired or not yours"
                    )
                request = pushed
            else:
                client, redirect_uri = self._client_and_redirect(params)
                if ctx.settings.require_par:
                    raise AuthorizationError(
                        "invalid_request",
                        "this server requires pushed authorization requests (RFC 9126 §5)",
                        redirect_uri=redirect_uri,
                        state=params.get("state"),
                    )
                request = self._request(params, client, redirect_uri)
        except AuthorizationError as e:
            self._refuse(h, e)
            return
        form_token = ctx.store.begin_login(request, now + ctx.settings.login_lifetime)
        page = login_page(client_id=request.client_id, scope=request.scope, form_token=form_token)
        h.send(200, page, PAGE_HEADERS)

    def _refuse(self, h: Handler, e: AuthorizationError) -> None:
        self.ctx.counters.reject(f"authorize_{e.error}")
        if e.redirect_uri is None:
            h.send(
                400,
                message_page("Authorization refused", f"{e.error}: {e.description}"),
                PAGE_HEADERS,
            )
            return
        params = {"error": e.error, "error_description": e.description}
        self._redirect(h, e.redirect_uri, params, e.state)

    def _redirect(
        self, h: Handler, redirect_uri: str, params: dict[str, str], state: str | None
    ) -> None:
        if state is not None:
            params["state"] = state
        params["iss"] = self.ctx.url  # RFC 9207 §2
        h.send(302, b"", [("Location", with_params(redirect_uri, params)), *PAGE_HEADERS])

    def _decision(
        self, h: Handler, body: bytes, *, approve: bool, title: str
    ) -> tuple[dict[str, str], str] | None:
        """The form a user posted from a login or device page, and the user name in it.

        None once a 400 page has been sent: the form is malformed, or it approves without a
        user name (a denial needs none).
        """
        try:
            form = self.ctx.form(h, body)
        except Reject as e:
            h.send(400, message_page("Bad request", e.description), PAGE_HEADERS)
            return None
        user = form.get("user", "")
        if approve and not _USER.fullmatch(user):
            h.send(400, message_page(title, "a user name is required"), PAGE_HEADERS)
            return None
        return form, user

    def decide(self, h: Handler, body: bytes, *, approve: bool) -> None:
        """``POST /authorize/approve`` or ``/authorize/deny``: end the login step."""
        ctx = self.ctx
        posted = self._decision(h, body, approve=approve, title="Sign in")
        if posted is None:
            return
        form, user = posted
        request = ctx.store.end_login(form.get("form_token", ""), ctx.settings.now())
        if request is None:
            ctx.counters.reject("login_form_token")
            page = message_page("Sign in", "this login form expired or was used already")
            h.send(400, page, PAGE_HEADERS)
            return
        if not approve:
            ctx.counters.add("authorizations_denied")
            params = {"error": "access_denied", "error_description": "the user denied access"}
            self._redirect(h, request.redirect_uri, params, request.state)
            return
        expires_at = ctx.settings.now() + ctx.settings.code_lifetime
        code = ctx.store.issue_code(request, user, expires_at)
        ctx.counters.add("authorizations_approved")
        ctx.counters.add("codes_issued")
        self._redirect(h, request.redirect_uri, {"code": code}, request.state)

    # --- /par -------------------------------------------------------------------------------

    def par(self, h: Handler, body: bytes) -> None:
        ctx = self.ctx
        try:
            form = ctx.form(h, body)
            client = ctx.client(h, form, PAR_PATH)
            if "request_uri" in form:  # RFC 9126 §2.1
                raise Reject(400, "par_request_uri", "invalid_request", "request_uri not allowed")
            if form.get("client_id", client.client_id) != client.client_id:
                raise Reject(400, "par_client_id", "invalid_request", "client_id mismatch")
            verified = ctx.proof(h, PAR_PATH, required=False)
            try:
                _, redirect_uri = self._client_and_redirect({**form, "client_id": client.client_id})
                request = self._request(
                    form, client, redirect_uri, proof_jkt=verified.jkt if verified else None
                )
            except AuthorizationError as e:  # RFC 9126 §2.3: errors as JSON, never redirected
                raise Reject(400, f"par_{e.error}", e.error, e.description) from e
            expires_in = max(1, round(ctx.settings.par_lifetime))
            request_uri = ctx.store.push(request, ctx.settings.now() + expires_in)
        except Reject as r:
            ctx.refuse(h, r)
            return
        ctx.counters.add("par_requests")
        ctx.answer(h, 201, {"request_uri": request_uri, "expires_in": expires_in})

    # --- /device (RFC 8628 §3.3) ------------------------------------------------------------

    def device_form(self, h: Handler) -> None:
        """The page to type a user code into, prefilled from ``verification_uri_complete``."""
        try:
            query = parse_pairs(urlsplit(h.path).query)
        except Reject as e:  # a malformed or repeated query is the browser's error, not ours
            h.send(400, message_page("Connect a device", e.description), PAGE_HEADERS)
            return
        h.send(200, device_page(user_code=query.get("user_code", "")), PAGE_HEADERS)

    def device_decide(self, h: Handler, body: bytes, *, approve: bool) -> None:
        """``POST /device/approve`` or ``/device/deny`` with the code the user typed."""
        ctx = self.ctx
        posted = self._decision(h, body, approve=approve, title="Connect a device")
        if posted is None:
            return
        form, user = posted
        record = ctx.store.device_by_user_code(form.get("user_code", ""), ctx.settings.now())
        if record is None or not ctx.store.decide_device(record, user or None, approve):
            ctx.counters.reject("device_user_code")
            page = message_page("Connect a device", "unknown, expired or already used code")
            h.send(400, page, PAGE_HEADERS)
            return
        ctx.counters.add("device_approvals" if approve else "device_denials")
        text = "The device is connected." if approve else "The device was refused."
        h.send(200, message_page("Connect a device", text), PAGE_HEADERS)
