"""DPoP for httpx: one generator flow for ``httpx.Client`` and ``httpx.AsyncClient``.

``DPoPAuth._flow`` drives :mod:`dpop_hsm.resource_flow` (every decision lives there): ask for a
token, have the request stamped, send, classify the response, and re-stamp and re-send at most
once. It yields three kinds of operation — "need a token", "sign this", "send this request" —
and the two drivers only add I/O and locking:

* ``sync_auth_flow`` runs everything inline; tokens come from the token client's thread-level
  single flight;
* ``async_auth_flow`` runs the flow on the event loop and only moves work that may block off
  it: a signature goes to the signer's own bounded pool unless the signer says it never blocks
  (:mod:`dpop_hsm.offload`; software keys sign inline), and waiting for a renewal that another
  thread runs goes to a worker thread. asyncio tasks of one loop queue for a renewal on a
  per-loop lock, and the renewal slot itself is shared with threads, so N tasks and M threads
  cause one token request.

Token requests are yielded through the same client (its transport, TLS, proxies, mocks) and
kept out of the API response's ``history`` (one of them holds the access token).
httpx raises its own exceptions for transport failures of any yielded request (the Auth API gives
no hook to translate them), so an unreachable AS surfaces as ``httpx.ConnectError`` here.

Redirects: httpx follows them *inside* one yielded request and copies the old ``DPoP`` header to
the new URL. :meth:`DPoPAuth.attach` installs a request event hook that re-signs same-origin
hops and strips (or refuses) cross-origin ones. On a client that was not attached, a ``trace``
extension on every stamped request strips our credentials from any hop whose URL is not the
one the proof names before its headers are written, so nothing leaks, and the flow then raises
:class:`RedirectError` saying to call ``attach()``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from functools import partial
from typing import Any, NamedTuple, TypeVar

from ._optional import requires_extra

with requires_extra("httpx"):
    import anyio
    import anyio.to_thread
    import httpx

from .errors import DPoPError, RedirectError, TokenResponseError
from .htu import normalize_htu, origin_of
from .jose import b64url_decode, split_compact
from .logs import http_logger, log_request, log_response
from .offload import AsyncFlowAdapter
from .resource_flow import CHALLENGE_STATUSES, Action, Stamp, nonce_fields
from .sansio import HttpRequest, HttpResponse
from .token import MAX_TOKEN_RESPONSE, Renewal, Token

__all__ = ["DPoPAuth"]

_EXT = "dpop_hsm"
_SENT = "dpop_hsm_sent_proof"
_TOKEN_REQUEST = "dpop_hsm_token_request"  # noqa: S105 - an extension name
T = TypeVar("T")
_DEBUG = logging.DEBUG  # module constants: no module or enum attribute lookup per request
_PASS = Action.PASS
_RENEW = Action.RENEW


class _NeedToken:
    """Flow marker: the driver must answer with a valid :class:`Token`."""


_NEED_TOKEN = _NeedToken()


class _Sign(NamedTuple):
    """Flow marker: the driver must answer with ``flow.stamp(method, url, token)``."""

    method: str
    url: str
    token: Token


# Hot path (one per request): the tuple built directly, not through the NamedTuple's Python
# ``__new__`` (a frozen dataclass cost ~0.3% of a request).
_new_sign = partial(tuple.__new__, _Sign)


_Op = httpx.Request | _NeedToken | _Sign


def _to_httpx(
    request: HttpRequest, timeout: tuple[float, float], *, is_async: bool
) -> httpx.Request:
    """A token request: TokenClient.timeout applies (requests yielded from an auth flow get no
    client timeout otherwise), it is marked so redirect hooks never let it follow, and a trace
    guard refuses to write it anywhere but the token endpoint (below)."""
    connect, read = timeout
    return httpx.Request(
        request.method,
        request.url,
        headers=list(request.headers),
        content=request.body,
        extensions={
            "timeout": {"connect": connect, "read": read, "write": read, "pool": connect},
            _TOKEN_REQUEST: True,
            "trace": _token_endpoint_guard(normalize_htu(request.url), is_async),
        },
    )


def _token_endpoint_guard(endpoint: str, is_async: bool) -> Callable[..., Any]:
    """An httpcore ``trace`` callback that stops a token request from going anywhere else.

    A client created with ``follow_redirects=True`` and never ``attach()``-ed follows a token
    endpoint's 307 inside one send, re-posting the body (client secret, assertion) and the
    proof; RFC 6749 §3.2 gives the token endpoint no redirects. httpx copies extensions to the
    hop, so this runs before the hop's headers are written and raises instead.
    """

    def check(info: dict[str, Any]) -> None:
        url = getattr(info.get("request"), "url", None)
        if url is None:
            return
        try:
            target = normalize_htu(bytes(url).decode("ascii", "replace"))
        except DPoPError:
            target = ""
        if target != endpoint:
            raise RedirectError(
                f"the token endpoint redirected to {origin_of(target or endpoint)}; not "
                "followed, nothing was sent there (call DPoPAuth.attach(client))"
            )

    if is_async:

        async def atrace(event: str, info: dict[str, Any]) -> None:
            if event.endswith("send_request_headers.started"):
                check(info)

        return atrace

    def trace(event: str, info: dict[str, Any]) -> None:
        if event.endswith("send_request_headers.started"):
            check(info)

    return trace


def _keep_bounded(response: httpx.Response, chunks: list[bytes]) -> None:
    # httpx reads every auth-flow response again after the flow moves on; give it the bytes
    # we already consumed (Response.read() returns ``_content`` when it is set).
    response._content = b"".join(chunks)


def _read_bounded(response: httpx.Response) -> None:
    """Read a token response, refusing bodies over MAX_TOKEN_RESPONSE (a hostile AS)."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > MAX_TOKEN_RESPONSE:
            response.close()
            raise TokenResponseError(f"token response larger than {MAX_TOKEN_RESPONSE} bytes")
        chunks.append(chunk)
    _keep_bounded(response, chunks)


async def _aread_bounded(response: httpx.Response) -> None:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_TOKEN_RESPONSE:
            await response.aclose()
            raise TokenResponseError(f"token response larger than {MAX_TOKEN_RESPONSE} bytes")
        chunks.append(chunk)
    _keep_bounded(response, chunks)


def _from_httpx(response: httpx.Response, url: str) -> HttpResponse:
    return HttpResponse(
        response.status_code, tuple(response.headers.multi_items()), response.content, url
    )


def _log_sent(request: httpx.Request) -> None:
    if not http_logger.isEnabledFor(logging.DEBUG):
        return  # per request: skip copying the headers and body for a log nobody reads
    stream = request.stream
    # ByteStream is in-memory (also on redirect hops, where .content is not set): safe to read.
    body: bytes | str = (
        b"".join(stream) if isinstance(stream, httpx.ByteStream) else "[streamed body]"
    )
    log_request(request.method, str(request.url), request.headers.multi_items(), body)


def _log_received(
    response: httpx.Response,
    headers: list[tuple[str, str]] | None = None,
    url: str | None = None,
) -> None:
    if not http_logger.isEnabledFor(logging.DEBUG):
        return
    body = response.content if hasattr(response, "_content") else None
    log_response(
        response.status_code,
        response.reason_phrase,
        response.headers.multi_items() if headers is None else headers,
        body,
        url=str(response.request.url) if url is None else url,
    )


def _advance(gen: Generator[T, Any, Any], value: Any) -> tuple[bool, Any]:
    """``gen.send`` that reports completion as a value (StopIteration cannot cross threads)."""
    try:
        return False, gen.send(value)
    except StopIteration as stop:
        return True, stop.value


def _proof_target(proof: str) -> tuple[str, str] | None:
    """(htm, htu) of one of OUR proofs, to recognize a redirect hop carrying a stale one."""
    try:
        payload = json.loads(b64url_decode(split_compact(proof)[1]))
    except (ValueError, DPoPError):
        return None
    if not isinstance(payload, dict):
        return None
    htm, htu = payload.get("htm"), payload.get("htu")
    return (htm, htu) if isinstance(htm, str) and isinstance(htu, str) else None


class _HopGuard:
    """An httpcore ``trace`` callback that keeps ``proof`` (and its token) off any other URL.

    httpcore calls it around every step of sending a request, for every redirect hop too (httpx
    copies extensions to the hop); right before a request's headers are written, a hop whose URL
    is not the proof's ``htu`` loses the ``DPoP`` header and a ``DPoP`` ``Authorization`` in
    place, before anything is sent. A ``trace`` the caller set is kept and still called.

    The fallback for clients that were not :meth:`DPoPAuth.attach`-ed: on an attached client
    the request hook sees every hop and takes the guard off before the first send, as httpcore
    then builds and sends an event per connection step (~4% of a request). A small class built
    per request: the ``htu`` and the proof's bytes are worked out only when a hop needs them.
    """

    __slots__ = ("inner", "proof", "url")

    def __init__(self, proof: str, url: str, inner: Any) -> None:
        self.proof = proof
        self.url = url
        self.inner = inner

    def strip(self, info: dict[str, Any]) -> None:
        req = info.get("request")
        headers = getattr(req, "headers", None)
        url = getattr(req, "url", None)
        if not isinstance(headers, list) or url is None:
            return
        ours = self.proof.encode("ascii")
        if not any(k.lower() == b"dpop" and v == ours for k, v in headers):
            return
        try:
            target = normalize_htu(bytes(url).decode("ascii", "replace"))
        except DPoPError:
            target = ""
        if target == normalize_htu(self.url):
            return
        headers[:] = [
            (k, v)
            for k, v in headers
            if k.lower() != b"dpop"
            and not (k.lower() == b"authorization" and v[:5].lower() == b"dpop ")
        ]


class _SyncHopGuard(_HopGuard):
    __slots__ = ()

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event.endswith("send_request_headers.started"):
            self.strip(info)
        if self.inner is not None:
            self.inner(event, info)


class _AsyncHopGuard(_HopGuard):
    __slots__ = ()

    async def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event.endswith("send_request_headers.started"):
            self.strip(info)
        if self.inner is not None:
            await self.inner(event, info)


class DPoPAuth(AsyncFlowAdapter, httpx.Auth):
    """httpx auth presenting a DPoP-bound token with a fresh proof on every request.

    A resource server's final 401/403 is returned like any other response (``raise_for_status()``
    works as usual) after at most one retry; ``raise_on_rejection=True`` raises
    :class:`UnauthorizedError` instead when its ``DPoP`` challenge carries an ``error``. A
    repeated nonce challenge always raises :class:`NonceError`.
    """

    requires_request_body = False  # streams stay streams; they are just never re-sent
    requires_response_body = False
    _other_lock: anyio.Lock | None = None  # the renewal lock when the loop is not asyncio's

    # --- the one flow ---------------------------------------------------------------------

    def _apply(self, request: httpx.Request, stamp: Stamp, *, is_async: bool) -> None:
        request.headers["Authorization"] = stamp.authorization
        request.headers["DPoP"] = stamp.proof
        ext = dict(request.extensions)
        inner = ext.get("trace")
        if isinstance(inner, _HopGuard):  # never nest our own guards
            inner = inner.inner
        guard = _AsyncHopGuard if is_async else _SyncHopGuard
        ext["trace"] = guard(stamp.proof, stamp.url, inner)
        ext[_STAMP] = stamp
        request.extensions = ext
        if http_logger.isEnabledFor(_DEBUG):
            _log_sent(request)

    def _flow(self, request: httpx.Request, is_async: bool) -> Generator[_Op, Any, None]:
        # Hand-optimised where marked: it runs for every request, and scripts/bench_async.py
        # compares its client CPU with a hand-made header's; every decision is ResourceFlow's.
        url = str(request.url)
        flow = self.flow
        flow.check_target(url)  # before any token is fetched or sent
        token: Token = yield _NEED_TOKEN
        stamp: Stamp = yield _new_sign((request.method, url, token))
        self._apply(request, stamp, is_async=is_async)
        response: httpx.Response = yield request
        replayable = isinstance(request.stream, httpx.ByteStream)
        retried = False
        while True:
            status = response.status_code
            final = response.request
            final_url = url if final is request else str(final.url)  # str() parses again
            if status in CHALLENGE_STATUSES or http_logger.isEnabledFor(_DEBUG):
                # Decoded once per response: httpx rebuilds the list on every multi_items() call.
                headers = response.headers.multi_items()
                _log_received(response, headers, final_url)
            else:
                # classify() reads no field of such a response: only the nonce is decoded (any
                # response may carry the next one, RFC 9449 §8.2).
                headers = nonce_fields(response.headers.raw)
            fresh = flow.observe(final_url, headers) if headers else None
            if final is not request:
                self._check_redirects(request, response)
            decision = flow.classify(
                status,
                headers,
                stamp=stamp,
                fresh_nonce=fresh,
                retried=retried,
                replayable=replayable,
            )
            action = decision.action
            if action is _PASS:
                _hide_token_traffic(response)
                return
            if action is _RENEW:
                flow.invalidate(stamp.token)
                token = yield _NEED_TOKEN
            retried = True
            stamp = yield _new_sign((request.method, url, token))
            self._apply(request, stamp, is_async=is_async)
            response = yield request

    def _check_redirects(self, request: httpx.Request, response: httpx.Response) -> None:
        final = response.request
        if final is not request and not final.extensions.get(_EXT):
            raise RedirectError(
                "httpx followed a redirect; the hop was sent without DPoP credentials. Call "
                "DPoPAuth.attach(client) so same-origin redirects are re-signed"
            )

    # --- sync driver ----------------------------------------------------------------------

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        return self.sync_auth_flow(request)

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        flow = self._flow(request, False)
        done, op = _advance(flow, None)
        while not done:
            value: Any
            if op is _NEED_TOKEN:
                # A cached token without a generator for _sync_token (one per request).
                value = self.token_client.cached_token()
                if value is None:
                    value = yield from self._sync_token()
            elif isinstance(op, _Sign):
                value = self.flow.stamp(op.method, op.url, op.token)
            else:
                value = yield op
            done, op = _advance(flow, value)

    def _sync_token(self) -> Generator[httpx.Request, httpx.Response, Token]:
        tc = self.token_client
        cached = tc.cached_token()
        got = cached if cached is not None else tc.acquire()
        if isinstance(got, Token):
            return got
        with got:
            try:
                tflow = got.flow()
                done, step = _advance(tflow, None)
                while not done:
                    sent = _to_httpx(step, tc.timeout, is_async=False)
                    response = yield sent
                    _refuse_redirected(response, sent)
                    _read_bounded(response)
                    _log_sent(sent)
                    _log_received(response)
                    done, step = _advance(tflow, _from_httpx(response, step.url))
                token: Token = step
                return token
            except DPoPError as e:
                return got.fallback(e)

    # --- async driver ---------------------------------------------------------------------

    def _async_lock(self) -> asyncio.Lock | anyio.Lock:
        try:
            return self._loop_locks.current()
        except RuntimeError:  # not asyncio (trio): one anyio lock
            if self._other_lock is None:
                self._other_lock = anyio.Lock()
            return self._other_lock

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        flow = self._flow(request, True)
        done, op = _advance(flow, None)
        tc = self.token_client
        offload = self._offload
        while not done:
            value: Any
            if isinstance(op, _Sign):
                if offload.inline:  # no coroutine for a signer that never blocks
                    value = self.flow.stamp(op.method, op.url, op.token)
                else:
                    value = await offload.run(self.flow.stamp, op.method, op.url, op.token)
            elif isinstance(op, _NeedToken):
                value = tc.cached_token()
                if value is None:
                    async with self._async_lock():
                        got = tc.try_acquire()
                        while got is None:  # another thread renews: wait off the loop, take nothing
                            await anyio.to_thread.run_sync(tc.wait_for_renewal)
                            got = tc.try_acquire()
                        if isinstance(got, Token):
                            value = got
                        else:
                            with got:
                                try:
                                    tflow = got.flow()
                                    step_in = self._renewal_runner()
                                    t_done, step = await step_in(_advance, tflow, None)
                                    while not t_done:
                                        sent = _to_httpx(step, tc.timeout, is_async=True)
                                        response = yield sent
                                        _refuse_redirected(response, sent)
                                        await _aread_bounded(response)
                                        _log_sent(sent)
                                        _log_received(response)
                                        parsed = _from_httpx(response, step.url)
                                        t_done, step = await step_in(_advance, tflow, parsed)
                                    value = step
                                except DPoPError as e:
                                    value = got.fallback(e)
            else:
                value = yield op
            done, op = _advance(flow, value)

    def _renewal_runner(self) -> Callable[..., Awaitable[Any]]:
        """Where renewal steps run: with the signatures, unless the token cache's renewal
        does blocking I/O itself (a shared cache's fleet lock): then in a worker thread."""
        if self.token_client.renewal_blocks:
            return anyio.to_thread.run_sync
        return self._offload.run

    # --- redirects ------------------------------------------------------------------------

    def attach(self, client: httpx.Client | httpx.AsyncClient) -> None:
        """Use this auth on ``client`` and re-sign / strip redirect hops (RFC 9449 §4.3).

        Idempotent: a second hook would take the first send for a redirect hop, so attaching
        twice (say, in a factory and again by its caller) adds nothing.
        """
        client.auth = self
        hook: Any = (
            self._async_redirect_hook
            if isinstance(client, httpx.AsyncClient)
            else self.redirect_hook
        )
        hooks = client.event_hooks
        present = hooks.get("request", [])
        if hook not in present:  # bound methods of one auth compare equal
            hooks["request"] = [*present, hook]
            client.event_hooks = hooks

    def _hop_action(self, request: httpx.Request, is_async: bool) -> Callable[[], None] | None:
        proof = request.headers.get("DPoP")
        ext = request.extensions
        if proof is None or ext.get(_SENT) != proof:
            # First send of this request (redirect requests copy the extensions, so a hop
            # still carrying the proof recorded here is recognized below, even to the same URL).
            if proof is not None:
                sent = {**ext, _SENT: proof}
                guard = sent.get("trace")
                if isinstance(guard, _HopGuard):
                    # This client is attached: this hook sees every hop, so the trace guard
                    # (the fallback for clients that are not) comes off; the caller's stays.
                    if guard.inner is None:
                        del sent["trace"]
                    else:
                        sent["trace"] = guard.inner
                request.extensions = sent
            return None
        url = str(request.url)
        if ext.get(_TOKEN_REQUEST):
            # RFC 6749 §3.2 gives the token endpoint no redirects; following one would re-send
            # the client secret / assertion to wherever it points.
            raise RedirectError(f"the token endpoint redirected to {origin_of(url)}; not followed")
        target = _proof_target(proof)
        request.extensions = {**ext, _EXT: "redirect"}
        stamp: Stamp | None = ext.get(_STAMP)
        del request.headers["DPoP"]
        authz = request.headers.get("Authorization", "")
        if authz[:5].lower() == "dpop ":
            del request.headers["Authorization"]
        if target is None or stamp is None or not self.flow.redirect(target[1], url):
            return None
        token = stamp.token

        def restamp() -> None:
            fresh = self.flow.stamp(request.method, url, token)
            self._apply(request, fresh, is_async=is_async)
            request.extensions = {**request.extensions, _SENT: fresh.proof, _EXT: "redirect"}

        return restamp

    def redirect_hook(self, request: httpx.Request) -> None:
        """httpx request event hook (``Client``): runs before every hop is sent."""
        action = self._hop_action(request, False)
        if action is not None:
            action()

    async def _async_redirect_hook(self, request: httpx.Request) -> None:
        action = self._hop_action(request, True)
        if action is not None:
            await self._offload.run(action)


_STAMP = "dpop_hsm_stamp"


def _hide_token_traffic(response: httpx.Response) -> None:
    """Keep token-endpoint exchanges out of the API response's ``history``.

    httpx lists every earlier response of an auth flow there; a token response holds the access
    token (and may hold a refresh token), which the application never needs to see.
    """
    if response.history:
        response.history = [
            r for r in response.history if not r.request.extensions.get(_TOKEN_REQUEST)
        ]


def _refuse_redirected(response: httpx.Response, sent: httpx.Request) -> None:
    """A token response that arrived through a redirect is never used (RFC 6749 §3.2).

    Without :meth:`DPoPAuth.attach`, a client created with ``follow_redirects=True`` follows
    redirects of token requests before the flow sees them; the token such a server hands out
    is refused here, and the error says how to stop the redirect from being followed at all.
    """
    # httpx puts earlier auth-flow responses into ``history`` too; a followed redirect shows
    # as a response to another request object than the one the flow yielded.
    if response.request is not sent:
        raise RedirectError(
            f"the token endpoint redirected to {origin_of(str(response.url))}; token refused. "
            "With follow_redirects=True, call DPoPAuth.attach(client) so token requests are "
            "never redirected"
        )


def _fallback(renewal: Renewal, error: DPoPError) -> Token:
    """Kept for callers of the old private helper: :meth:`Renewal.fallback` is the rule."""
    return renewal.fallback(error)
