"""DPoP for ``requests``: :class:`DPoPAuth` (an ``AuthBase``) and :class:`DPoPSession`.

Modelled on ``HTTPDigestAuth``: ``__call__`` stamps ``Authorization: DPoP <token>`` and a fresh
proof (``ath``, the origin's nonce) and registers a response hook. The hook feeds every
response's ``DPoP-Nonce`` into the store and re-sends AT MOST ONCE, keeping the first response in
``history``: for a ``use_dpop_nonce`` challenge with a new proof (RFC 9449 §9), or for
``invalid_token`` after one forced token renewal. A body that cannot be replayed (a generator or
a file) is never re-sent (pitfall 9).

Token requests go through the same ``requests.Session`` as the API requests when the auth knows
it: :class:`DPoPSession` passes itself, and ``DPoPAuth(client, session=s)`` does the same for
your own session; otherwise the token client's own session is used.

Redirects (pitfall 14): requests would re-send the old ``DPoP`` header to the new URL. The hook
removes our credentials from a request whose response is a redirect, so a plain session follows
it *unauthenticated*; :class:`DPoPSession` re-signs same-origin hops with a new proof for the
new method and URL and strips (or, with ``cross_origin_redirects="refuse"``, refuses) hops to
another origin, so a token never travels to a server it was not meant for.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import requests
import urllib3
from requests.auth import AuthBase
from requests.cookies import extract_cookies_to_jar
from requests.models import PreparedRequest, Response

from .challenges import find_challenge
from .errors import ConfigurationError, NonceError, RedirectError, TransportError, UnauthorizedError
from .htu import origin_of
from .logs import log_request, log_response
from .token import Token, TokenClient, require_https
from .token_http import HttpRequest, HttpResponse, header_values

__all__ = ["DPoPAuth", "DPoPSession", "send_http_request"]

RedirectPolicy = Literal["strip", "refuse"]
MAX_RESPONSE_BODY = 1024 * 1024
_TOKEN_ATTR = "_dpop_hsm_token"  # noqa: S105 - an attribute name
_RETRIED_ATTR = "_dpop_hsm_retried"
_NONCE_ATTR = "_dpop_hsm_nonce"


def _no_auth(r: PreparedRequest) -> PreparedRequest:
    """Overrides the session's own auth for token requests (no recursion into DPoPAuth)."""
    return r


def response_headers(response: Response) -> list[tuple[str, str]]:
    """Every header field, repeats kept (urllib3's raw headers), else the merged view."""
    raw_headers = getattr(response.raw, "headers", None)
    iteritems = getattr(raw_headers, "iteritems", None)
    if callable(iteritems):
        return [(str(k), str(v)) for k, v in iteritems()]
    return [(str(k), str(v)) for k, v in response.headers.items()]


def _loggable_body(body: Any) -> bytes | str | None:
    if body is None or isinstance(body, bytes | str):
        return body
    return "[streamed body]"


def send_http_request(
    session: requests.Session, request: HttpRequest, *, timeout: tuple[float, float]
) -> HttpResponse:
    """Send a sans-IO request through ``session`` (its proxies, TLS, adapters, cookies apply).

    Raises :class:`TransportError` on connection errors and timeouts; never follows redirects.
    ``timeout`` is (connect, read) per socket operation, as in requests; on top of that the
    whole exchange must finish within connect + 2 x read seconds, so a server dripping bytes
    slower than the read timeout cannot hold a token renewal (and its waiters) for hours.
    """
    deadline = time.monotonic() + timeout[0] + 2 * timeout[1]
    try:
        response = session.request(
            request.method,
            request.url,
            headers=dict(request.headers),
            data=request.body,
            auth=_no_auth,
            timeout=timeout,
            allow_redirects=False,
            stream=True,
        )
    except requests.exceptions.RequestException as e:
        origin = origin_of(request.url)
        raise TransportError(f"cannot reach {origin}: {type(e).__name__}") from e
    try:
        body = _read_body(response, deadline, request.url)
    # urllib3 raises its own ProtocolError (IncompleteRead) when the server drops mid-body.
    except (
        requests.exceptions.RequestException,
        urllib3.exceptions.HTTPError,
        OSError,
        ValueError,
    ) as e:
        raise TransportError(f"reading the response from {origin_of(request.url)} failed") from e
    finally:
        response.close()
    prepared = response.request
    log_request(
        prepared.method or request.method, request.url, prepared.headers.items(), request.body
    )
    headers = response_headers(response)
    log_response(response.status_code, response.reason or "", headers, body, url=request.url)
    return HttpResponse(response.status_code, tuple(headers), body or b"", request.url)


def _read_body(response: Response, deadline: float, url: str) -> bytes:
    """At most MAX_RESPONSE_BODY + 1 bytes, in whatever pieces arrive, before ``deadline``."""
    raw = response.raw
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_RESPONSE_BODY:
        if time.monotonic() > deadline:
            raise TransportError(f"{origin_of(url)} did not send its response in time")
        chunk = raw.read1(MAX_RESPONSE_BODY + 1 - size, decode_content=True)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _replayable(prep: PreparedRequest) -> bool:
    return prep.body is None or isinstance(prep.body, bytes | str)


class DPoPAuth(AuthBase):
    """``requests`` auth that presents a DPoP-bound token with a fresh proof per request.

    ``raise_on_rejection``: when the resource server still refuses after any allowed retry with
    a ``DPoP`` challenge carrying an ``error``, raise :class:`UnauthorizedError` (default) instead
    of returning the 401. A repeated nonce challenge always raises :class:`NonceError`.
    """

    def __init__(
        self,
        token_client: TokenClient,
        *,
        session: requests.Session | None = None,
        raise_on_rejection: bool = True,
        cross_origin_redirects: RedirectPolicy = "strip",
    ) -> None:
        if cross_origin_redirects not in ("strip", "refuse"):
            raise ConfigurationError("cross_origin_redirects must be 'strip' or 'refuse'")
        self.token_client = token_client
        self.session = session
        self.raise_on_rejection = raise_on_rejection
        self.cross_origin_redirects: RedirectPolicy = cross_origin_redirects

    def __repr__(self) -> str:
        return f"DPoPAuth({self.token_client!r})"

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
        url = r.url or ""
        nonce = self.token_client.nonces.get(url)
        proof = self.token_client.proofs.create(
            r.method or "GET", url, access_token=token.access_token, nonce=nonce
        )
        r.headers["Authorization"] = f"{token.token_type} {token.access_token}"
        r.headers["DPoP"] = proof
        setattr(r, _TOKEN_ATTR, token)
        setattr(r, _NONCE_ATTR, nonce)
        log_request(r.method or "GET", url, r.headers.items(), _loggable_body(r.body))

    def __call__(self, r: PreparedRequest) -> PreparedRequest:
        require_https(r.url or "", "resource URL")  # before any token is fetched or sent
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
        nonce = self.token_client.nonces.observe(r.url, headers)
        prep = r.request
        if r.is_redirect:
            # Pitfall 14: the old proof must never reach the new URL. DPoPSession.rebuild_auth
            # re-signs same-origin hops; a plain session follows without our credentials.
            _strip_credentials(prep)
            return r
        if r.status_code not in (401, 403):
            return r
        challenge = find_challenge(header_values(headers, "www-authenticate"), "DPoP")
        if challenge is None:
            return r
        error = challenge.params.get("error")
        description = challenge.params.get("error_description")
        retried = bool(getattr(prep, _RETRIED_ATTR, False))
        token: Token | None = getattr(prep, _TOKEN_ATTR, None)
        if token is None:
            return r
        if r.status_code == 401 and error == "use_dpop_nonce":
            if retried:
                raise NonceError("the resource server rejected our nonce again (RFC 9449 §9)")
            if nonce is None:
                raise NonceError("use_dpop_nonce without a DPoP-Nonce header (RFC 9449 §9)")
            if nonce == getattr(prep, _NONCE_ATTR, None):
                raise NonceError("the resource server handed back the nonce it just rejected")
            if _replayable(prep):
                return self._resend(r, token, kwargs)
        elif (
            r.status_code == 401 and error == "invalid_token" and not retried and _replayable(prep)
        ):
            self.token_client.invalidate(token)
            return self._resend(r, self.token(), kwargs)
        if self.raise_on_rejection and error:
            why = "" if _replayable(prep) else " (body not replayable, no retry)"
            raise UnauthorizedError(
                f"resource server rejected the request{why}",
                error=error,
                error_description=description,
                status=r.status_code,
            )
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
        adapter = r.connection
        resent: Response = adapter.send(prep, **kwargs)
        resent.history.append(r)
        resent.request = prep
        return self._handle_response(resent, **kwargs)

    def restamp_redirect(self, prepared: PreparedRequest, response: Response) -> None:
        """Credentials for a redirect hop: a new proof on the same origin, none elsewhere."""
        _strip_credentials(prepared)
        token: Token | None = getattr(response.request, _TOKEN_ATTR, None)
        if token is None:
            return
        old, new = response.request.url or "", prepared.url or ""
        if origin_of(old) == origin_of(new):
            require_https(new, "redirect target")
            if not token.is_valid():
                token = self.token()
            self.stamp(prepared, token)
            return
        if self.cross_origin_redirects == "refuse":
            raise RedirectError(
                f"refusing to follow a redirect from {origin_of(old)} to {origin_of(new)} "
                "with DPoP credentials"
            )


def _strip_credentials(prep: PreparedRequest) -> None:
    auth = prep.headers.get("Authorization")
    if hasattr(prep, _TOKEN_ATTR) or (isinstance(auth, str) and auth[:5].lower() == "dpop "):
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
        raise_on_rejection: bool = True,
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
