"""DPoP for aiohttp (≥ 3.12): :class:`DPoPMiddleware`, a client middleware.

``aiohttp.ClientSession(middlewares=(DPoPMiddleware(token_client),))`` stamps every request
with ``Authorization: DPoP <token>`` and a fresh proof and handles the resource server's
answers through :mod:`dpop_hsm.resource_flow` (one nonce retry, one renewal on
``invalid_token``, never a loop). Everything runs on the event loop except what may block: a
signature of a signer that may block goes to the signer's own bounded pool
(:mod:`dpop_hsm.offload`), and waiting for a renewal another thread runs goes to a worker.

Token requests go through the same session (its connector, TLS, proxies and cookies) with
``middlewares=()``, never follow redirects, are bounded in size and time
(``TokenClient.timeout``), and appear in the masked ``dpop_hsm.http`` session log.

Redirects: aiohttp rebuilds each hop from the caller's original headers and runs the middleware
again, so a hop never carries the old proof. The middleware remembers, per task, where the
previous response pointed: a hop to the same origin gets a new proof; a hop to another origin
goes out without credentials (``cross_origin_redirects="strip"``) or raises
:class:`~dpop_hsm.errors.RedirectError` (``"refuse"``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Generator, Sequence
from typing import Any, TypeVar

from ._optional import requires_extra

with requires_extra("aiohttp"):
    import aiohttp
    from aiohttp import hdrs
    from aiohttp import payload as aiohttp_payload
    from multidict import istr
    from yarl import URL

from .errors import DPoPError, TokenResponseError, TransportError
from .htu import origin_of
from .logs import http_logger, log_request, log_response
from .offload import AsyncFlowAdapter
from .resource_flow import CHALLENGE_STATUSES, Action, nonce_fields
from .sansio import HttpRequest, HttpResponse
from .token import MAX_TOKEN_RESPONSE, Token

__all__ = ["AiohttpTransportError", "DPoPMiddleware"]

T = TypeVar("T")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Looked up once per request: prebuilt case-insensitive names spare multidict the case fold,
# module constants spare the enum and module attribute lookups.
_AUTHORIZATION = hdrs.AUTHORIZATION
_DPOP = istr("DPoP")
_DPOP_NONCE = istr("DPoP-Nonce")
_DEBUG = logging.DEBUG
_PASS = Action.PASS
_RENEW = Action.RENEW
_NO_FIELDS: tuple[tuple[str, str], ...] = ()
# Per task: (origin the last response came from, URL its Location points to).
_pending_hop: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "dpop_hsm_aiohttp_pending_hop", default=None
)


class AiohttpTransportError(TransportError, aiohttp.ClientConnectionError):
    """A token request that failed: a ``DPoPError`` and an ``aiohttp.ClientError`` at once,
    so code that already catches aiohttp's errors around ``session.get()`` needs no change."""


def _advance(gen: Generator[T, Any, Any], value: Any) -> tuple[bool, Any]:
    try:
        return False, gen.send(value)
    except StopIteration as stop:
        return True, stop.value


def _headers(response: aiohttp.ClientResponse) -> list[tuple[str, str]]:
    """Every header field as sent, repeats kept (two ``DPoP-Nonce`` fields stay two)."""
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers]


def _loggable_body(request: aiohttp.ClientRequest) -> bytes | str | None:
    body = request.body
    if body == b"":
        return None
    if isinstance(body, aiohttp_payload.BytesPayload):
        value = body._value
        return bytes(value) if isinstance(value, bytes | bytearray | memoryview) else None
    return "[streamed body]"


class DPoPMiddleware(AsyncFlowAdapter):
    """aiohttp client middleware presenting a DPoP-bound token with a fresh proof per request.

    ``raise_on_rejection``: a final 401/403 with a ``DPoP`` challenge carrying an ``error``
    raises :class:`~dpop_hsm.errors.UnauthorizedError` instead of returning the response
    (default: return it, like every other status). A repeated nonce challenge always raises
    :class:`~dpop_hsm.errors.NonceError`.
    """

    # The last request URL and its string: str() of a yarl URL is rebuilt on every call.
    _last_url: tuple[URL | None, str] = (None, "")

    # --- the middleware -------------------------------------------------------------------

    async def __call__(
        self,
        request: aiohttp.ClientRequest,
        handler: aiohttp.ClientHandlerType,
    ) -> aiohttp.ClientResponse:
        # Hand-optimised: this runs for every request, and scripts/bench_async.py holds it to
        # 1.11x the client CPU of a hand-made header (each Python call here is ~0.2% of a
        # request). Hence the inlined helpers, the cached URL string and the prebuilt header
        # names below; every decision is still ResourceFlow's.
        target = request.url
        last = self._last_url
        if target is last[0]:  # yarl hands out one URL object per URL string (its own cache)
            url = last[1]
        else:
            url = str(target)
            self._last_url = (target, url)  # one tuple store: safe across threads
        pending = _pending_hop.get()
        if pending is not None:
            _pending_hop.set(None)
            if not self._may_stamp_after_redirect(pending, request):
                return await handler(request)  # a cross-origin hop: no credentials at all
        flow = self.flow
        flow.check_target(url)  # before any token is fetched or sent
        # The common case without a coroutine per step: a cached token, a signer that never
        # blocks (each await of a helper coroutine costs more than the dict lookups it wraps).
        token = self.token_client.cached_token()
        if token is None:
            token = await self._token(request.session)
        body = request.body  # in-memory bodies can be sent again; streams and generators not
        replayable = body == b"" or isinstance(body, aiohttp_payload.BytesPayload)
        fields = request.headers
        retried = False
        while True:
            if self._offload.inline:
                stamp = flow.stamp(request.method, url, token)
            else:
                stamp = await self._offload.run(flow.stamp, request.method, url, token)
            fields[_AUTHORIZATION] = stamp.authorization
            fields[_DPOP] = stamp.proof
            if http_logger.isEnabledFor(_DEBUG):  # per request: no header copy for no log
                log_request(request.method, url, fields.items(), _loggable_body(request))
            response = await handler(request)
            status = response.status
            headers: Sequence[tuple[str, str]]
            try:
                if status in CHALLENGE_STATUSES or http_logger.isEnabledFor(_DEBUG):
                    headers = _headers(response)
                    log_response(status, response.reason or "", headers, None, url=url)
                elif _DPOP_NONCE in response.headers:
                    # classify() reads no field of such a response, so only the nonce is
                    # decoded (any response may carry the next nonce, RFC 9449 §8.2). The
                    # parsed view holds a field with this ASCII name, in any case, exactly
                    # when raw_headers does: a C lookup first.
                    headers = nonce_fields(response.raw_headers)
                else:
                    headers = _NO_FIELDS
                fresh = flow.observe(url, headers) if headers else None
                decision = flow.classify(
                    status,
                    headers,
                    stamp=stamp,
                    fresh_nonce=fresh,
                    retried=retried,
                    replayable=replayable,
                )
            except BaseException:
                response.release()  # the caller never sees it: give the connection back
                raise
            action = decision.action
            if action is _PASS:
                if status in _REDIRECT_STATUSES:
                    self._remember_redirect(response, url)
                return response
            response.release()
            if action is _RENEW:
                flow.invalidate(stamp.token)
                token = await self._token(request.session)
            retried = True

    def _may_stamp_after_redirect(
        self, pending: tuple[str, str], request: aiohttp.ClientRequest
    ) -> bool:
        """Right after a redirect in this task: may this request carry our credentials?

        The hop is recognized by origin, not by its exact URL (aiohttp drops a Location's
        fragment, and a near-miss must never mean "a new request, stamp it"): a request to
        another origin than the redirecting one goes out bare — or raises under the "refuse"
        policy when it is the redirect target itself. The same origin gets a fresh proof.
        """
        from_origin, target = pending
        url = str(request.url.with_fragment(None))
        if origin_of(url) == from_origin:
            return self.flow.redirect(from_origin, url)  # same origin: https rule, re-sign
        if url == target:
            self.flow.redirect(from_origin, url)  # raises RedirectError under "refuse"
        return False

    def _remember_redirect(self, response: aiohttp.ClientResponse, url: str) -> None:
        location = response.headers.get("Location")
        if location:
            try:
                target = str(response.url.join(URL(location)).with_fragment(None))
            except ValueError:
                return
            _pending_hop.set((origin_of(url), target))

    # --- tokens ---------------------------------------------------------------------------

    async def _token(self, session: aiohttp.ClientSession) -> Token:
        """A valid token: cached, or one renewal per loop (and per client, across threads)."""
        tc = self.token_client
        cached = tc.cached_token()
        if cached is not None:
            return cached
        async with self._loop_locks.current():
            got = tc.try_acquire()
            while got is None:  # another thread renews: wait for it off the loop, taking nothing
                await asyncio.get_running_loop().run_in_executor(None, tc.wait_for_renewal)
                got = tc.try_acquire()
            if isinstance(got, Token):
                return got
            with got:
                try:
                    flow = got.flow()
                    done, step = await self._renewal_step(flow, None)
                    while not done:
                        answer = await self._send_token_request(session, step)
                        done, step = await self._renewal_step(flow, answer)
                    token: Token = step
                    return token
                except DPoPError as e:
                    return got.fallback(e)

    async def _renewal_step(self, flow: Generator[Any, Any, Any], value: Any) -> tuple[bool, Any]:
        """One step of a renewal: with the signatures, unless the token cache's renewal does
        blocking I/O itself (a shared cache's fleet lock): then in a worker thread."""
        if self.token_client.renewal_blocks:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, _advance, flow, value)
        return await self._offload.run(_advance, flow, value)

    async def _send_token_request(
        self, session: aiohttp.ClientSession, request: HttpRequest
    ) -> HttpResponse:
        """One token request through ``session``: no middlewares, no redirects, bounded."""
        connect, read = self.token_client.timeout
        timeout = aiohttp.ClientTimeout(total=connect + 2 * read, connect=connect, sock_read=read)
        origin = origin_of(request.url)
        log_request(request.method, request.url, request.headers, request.body)
        try:
            async with session.request(
                request.method,
                request.url,
                data=request.body,
                headers=list(request.headers),
                allow_redirects=False,
                middlewares=(),
                timeout=timeout,
                auto_decompress=True,
            ) as response:
                chunks: list[bytes] = []
                size = 0
                while chunk := await response.content.read(65536):
                    size += len(chunk)
                    if size > MAX_TOKEN_RESPONSE:
                        raise TokenResponseError(
                            f"token response larger than {MAX_TOKEN_RESPONSE} bytes"
                        )
                    chunks.append(chunk)
                body = b"".join(chunks)
                headers = tuple(_headers(response))
                status = response.status
                reason = response.reason or ""
        except (aiohttp.ClientError, TimeoutError) as e:
            raise AiohttpTransportError(f"cannot reach {origin}: {type(e).__name__}") from e
        log_response(status, reason, headers, body, url=request.url)
        return HttpResponse(status, headers, body, request.url)
