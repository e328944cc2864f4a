"""DPoP for ``requests``: :class:`DPoPAuth` (an ``AuthBase``) and :class:`DPoPSession`.

Modelled on ``HTTPDigestAuth``: ``__call__`` stamps ``Authorization: DPoP <token>`` and a fresh
proof (``ath``, the origin's nonce) and registers a response hook. The hook feeds every
response's ``DPoP-Nonce`` into the store and re-sends AT MOST ONCE, keeping the first response in
``history``: for a ``use_dpop_nonce`` challenge with a new proof (RFC 9449 §9), or for
``invalid_token`` after one forced token renewal. A body that cannot be replayed (a generator or
a file) is never re-sent. Every decision comes from :mod:`dpop_hsm.resource_flow`; this module
only moves requests and responses.

Token requests go through the same ``requests.Session`` as the API requests when the auth knows
it: :class:`DPoPSession` passes itself, and ``DPoPAuth(client, session=s)`` does the same for
your own session; otherwise the token client's own session is used.

Redirects: requests would re-send the old ``DPoP`` header to the new URL. The hook
removes our credentials from a request whose response is a redirect, so a plain session follows
it *unauthenticated*; :class:`DPoPSession` re-signs same-origin hops with a new proof for the
new method and URL and strips (or, with ``cross_origin_redirects="refuse"``, refuses) hops to
another origin, so a token never travels to a server it was not meant for.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urljoin

import requests
from requests.auth import AuthBase
from requests.cookies import extract_cookies_to_jar
from requests.models import PreparedRequest, Response

from ._requests_sender import MAX_RESPONSE_BODY, response_headers, send_http_request
from .logs import log_request, log_response
from .resource_flow import Action, FlowAdapter, RedirectPolicy, Stamp
from .token import Token, TokenClient

__all__ = ["MAX_RESPONSE_BODY", "DPoPAuth", "DPoPSession", "response_headers", "send_http_request"]

_STAMP_ATTR = "_dpop_hsm_stamp"
_RETRIED_ATTR = "_dpop_hsm_retried"


def _loggable_body(body: Any) -> bytes | str | None:
    if body is None or isinstance(body, bytes | str):
        return body
    return "[streamed body]"


def _replayable(prep: PreparedRequest) -> bool:
    return prep.body is None or isinstance(prep.body, bytes | str)


class DPoPAuth(FlowAdapter, AuthBase):
    """``requests`` auth that presents a DPoP-bound token with a fresh proof per request.

    A resource server's final 401/403 is returned like any other response (``raise_for_status()``
    works as usual) after at most one retry; ``raise_on_rejection=True`` raises
    :class:`UnauthorizedError` instead when its ``DPoP`` challenge carries an ``error``. A
    repeated nonce challenge always raises :class:`NonceError`.
    """

    def __init__(
        self,
        token_client: TokenClient,
        *,
        session: requests.Session | None = None,
        raise_on_rejection: bool = False,
        cross_origin_redirects: RedirectPolicy = "strip",
    ) -> None:
        super().__init__(
            token_client,
            raise_on_rejection=raise_on_rejection,
            cross_origin_redirects=cross_origin_redirects,
        )
        self.token_client = token_client
        self.session = session

    # --- token --------------------------------------------------------------------------

    def token(self) -> Token:
        """A valid token; fetched through ``session`` when one is known."""
        tc = self.token_client
        cached = tc.cached_token()
        if cached is not None:
            return cached
        if self.session is None:
            return tc.get_token()
        session = self.session
        return tc.get_token(lambda req: send_http_request(session, req, timeout=tc.timeout))

    # --- stamping -----------------------------------------------------------------------

    def stamp(self, r: PreparedRequest, token: Token) -> None:
        """Set Authorization and a new proof for ``r``'s current method and URL (RFC 9449 §7)."""
        stamp = self.flow.stamp(r.method or "GET", r.url or "", token)
        r.headers["Authorization"] = stamp.authorization
        r.headers["DPoP"] = stamp.proof
        setattr(r, _STAMP_ATTR, stamp)
        log_request(stamp.method, stamp.url, r.headers.items(), _loggable_body(r.body))

    def __call__(self, r: PreparedRequest) -> PreparedRequest:
        self.flow.check_target(r.url or "")  # before any token is fetched or sent
        self.stamp(r, self.token())
        if self._handle_response not in r.hooks["response"]:
            r.register_hook("response", self._handle_response)  # type: ignore[no-untyped-call]
        return r

    # --- responses ----------------------------------------------------------------------

    def _handle_response(self, r: Response, **kwargs: Any) -> Response:
        headers = response_headers(r)
        stream = bool(kwargs.get("stream"))
        log_response(
            r.status_code, r.reason or "", headers, None if stream else r.content, url=r.url
        )
        fresh = self.flow.observe(r.url, headers)
        prep = r.request
        if r.is_redirect:
            # The old proof must never reach the new URL: DPoPSession.rebuild_auth re-signs
            # same-origin hops; a plain session follows without our credentials, and under
            # the "refuse" policy a hop to another origin raises here, before it is sent
            # (a response hook cannot see allow_redirects, so this applies to every redirect).
            if self.cross_origin_redirects == "refuse" and hasattr(prep, _STAMP_ATTR):
                target = urljoin(r.url, r.headers.get("location", ""))
                self.flow.redirect(r.url, target)
            _strip_credentials(prep)
            return r
        stamp: Stamp | None = getattr(prep, _STAMP_ATTR, None)
        if stamp is None:
            return r
        decision = self.flow.classify(
            r.status_code,
            headers,
            stamp=stamp,
            fresh_nonce=fresh,
            retried=bool(getattr(prep, _RETRIED_ATTR, False)),
            replayable=_replayable(prep),
        )
        if decision.action is Action.RETRY_NONCE:
            return self._resend(r, stamp.token, kwargs)
        if decision.action is Action.RENEW:
            self.flow.invalidate(stamp.token)
            return self._resend(r, self.token(), kwargs)
        return r

    def _resend(self, r: Response, token: Token, kwargs: dict[str, Any]) -> Response:
        """HTTPDigestAuth-style single resend: same connection adapter, first response kept."""
        r.content  # noqa: B018 - consume the body so the connection can be reused
        r.close()
        prep = r.request.copy()
        cookies = getattr(prep, "_cookies", None)
        if cookies is not None:
            extract_cookies_to_jar(cookies, r.request, r.raw)  # type: ignore[no-untyped-call]
            prep.prepare_cookies(cookies)
        self.stamp(prep, token)
        setattr(prep, _RETRIED_ATTR, True)
        # requests follows redirects of the resent request from the ORIGINAL one: its proof is
        # spent and names the old attempt, so it must not ride along to a redirect target.
        _strip_credentials(r.request)
        adapter = r.connection
        resent: Response = adapter.send(prep, **kwargs)
        resent.history.append(r)
        resent.request = prep
        return self._handle_response(resent, **kwargs)

    def restamp_redirect(self, prepared: PreparedRequest, response: Response) -> None:
        """Credentials for a redirect hop: a new proof on the same origin, none elsewhere."""
        _strip_credentials(prepared)
        stamp: Stamp | None = getattr(response.request, _STAMP_ATTR, None)
        if stamp is None:
            return
        if self.flow.redirect(response.request.url or "", prepared.url or ""):
            token = stamp.token if stamp.token.is_valid() else self.token()
            self.stamp(prepared, token)


def _strip_credentials(prep: PreparedRequest) -> None:
    auth = prep.headers.get("Authorization")
    if hasattr(prep, _STAMP_ATTR) or (isinstance(auth, str) and auth[:5].lower() == "dpop "):
        prep.headers.pop("Authorization", None)
    prep.headers.pop("DPoP", None)


class DPoPSession(requests.Session):
    """A ``requests.Session`` that sends every request with DPoP and re-signs redirects.

    Token requests go through this session too (with its proxies, TLS settings and adapters).
    """

    def __init__(
        self,
        token_client: TokenClient,
        *,
        raise_on_rejection: bool = False,
        cross_origin_redirects: RedirectPolicy = "strip",
    ) -> None:
        super().__init__()
        self.dpop_auth = DPoPAuth(
            token_client,
            session=self,
            raise_on_rejection=raise_on_rejection,
            cross_origin_redirects=cross_origin_redirects,
        )
        self.auth = self.dpop_auth

    def rebuild_auth(self, prepared_request: PreparedRequest, response: Response) -> None:
        super().rebuild_auth(prepared_request, response)  # type: ignore[no-untyped-call]
        self.dpop_auth.restamp_redirect(prepared_request, response)
