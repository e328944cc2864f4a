"""DPoP for httpx: one generator flow for ``httpx.Client`` and ``httpx.AsyncClient``.

``DPoPAuth._flow`` is the protocol: ask for a token, stamp ``Authorization: DPoP`` plus a fresh
proof, send, feed the response's ``DPoP-Nonce`` to the store, and re-stamp and re-send at most
once — on ``use_dpop_nonce`` (RFC 9449 §9) or, after one forced renewal, on ``invalid_token``.
It yields requests and a "need a token" marker. The two drivers only add I/O and locking:

* ``sync_auth_flow`` runs the flow inline and fetches tokens under the token client's
  thread-level single flight;
* ``async_auth_flow`` advances the flow in a worker thread (``anyio.to_thread``), because every
  step may sign and a YubiKey or TPM takes 10-100+ ms; asyncio tasks of one loop queue on a
  per-loop lock, and the renewal slot itself is shared with threads, so N tasks and M threads
  cause one token request.

Token requests are yielded through the same client (its transport, TLS, proxies, mocks).
httpx raises its own exceptions for transport failures of any yielded request (the Auth API gives
no hook to translate them), so an unreachable AS surfaces as ``httpx.ConnectError`` here.

Redirects: httpx follows them *inside* one yielded request, re-sending the old ``DPoP`` header
(pitfall 14). :meth:`DPoPAuth.attach` installs a request event hook that re-signs same-origin
hops and strips (or refuses) cross-origin ones. Without it, a followed redirect raises
:class:`RedirectError` after the fact instead of passing silently.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any, Literal, TypeVar

from ._optional import requires_extra

with requires_extra("httpx"):
    import anyio
    import anyio.to_thread
    import httpx

from .challenges import find_challenge
from .errors import (
    ConfigurationError,
    DPoPError,
    NonceError,
    RedirectError,
    TokenResponseError,
    UnauthorizedError,
)
from .htu import origin_of
from .jose import b64url_decode, split_compact
from .logs import log_request, log_response
from .token import MAX_TOKEN_RESPONSE, Renewal, Token, TokenClient, require_https
from .token_http import HttpRequest, HttpResponse, header_values

__all__ = ["DPoPAuth"]

RedirectPolicy = Literal["strip", "refuse"]
_EXT = "dpop_hsm"
_SENT = "dpop_hsm_sent_proof"
_TOKEN_REQUEST = "dpop_hsm_token_request"  # noqa: S105 - an extension name
T = TypeVar("T")


class _NeedToken:
    """Flow marker: the driver must answer with a valid :class:`Token`."""


_NEED_TOKEN = _NeedToken()
_Op = httpx.Request | _NeedToken


def _to_httpx(request: HttpRequest, timeout: tuple[float, float]) -> httpx.Request:
    """A token request: TokenClient.timeout applies (requests yielded from an auth flow get no
    client timeout otherwise), and it is marked so redirect hooks never let it follow."""
    connect, read = timeout
    return httpx.Request(
        request.method,
        request.url,
        headers=list(request.headers),
        content=request.body,
        extensions={
            "timeout": {"connect": connect, "read": read, "write": read, "pool": connect},
            _TOKEN_REQUEST: True,
        },
    )


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
    stream = request.stream
    # ByteStream is in-memory (also on redirect hops, where .content is not set): safe to read.
    body: bytes | str = (
        b"".join(stream) if isinstance(stream, httpx.ByteStream) else "[streamed body]"
    )
    log_request(request.method, str(request.url), request.headers.multi_items(), body)


def _log_received(response: httpx.Response) -> None:
    body = response.content if hasattr(response, "_content") else None
    log_response(
        response.status_code,
        response.reason_phrase,
        response.headers.multi_items(),
        body,
        url=str(response.request.url),
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


class DPoPAuth(httpx.Auth):
    """httpx auth presenting a DPoP-bound token with a fresh proof on every request.

    ``raise_on_rejection``: a final 401/403 with a ``DPoP`` challenge carrying an ``error``
    raises :class:`UnauthorizedError` (default) instead of returning the response. A repeated
    nonce challenge always raises :class:`NonceError`.
    """

    requires_request_body = False  # streams stay streams; they are just never re-sent
    requires_response_body = False

    def __init__(
        self,
        token_client: TokenClient,
        *,
        raise_on_rejection: bool = True,
        cross_origin_redirects: RedirectPolicy = "strip",
    ) -> None:
        if cross_origin_redirects not in ("strip", "refuse"):
            raise ConfigurationError("cross_origin_redirects must be 'strip' or 'refuse'")
        self.token_client = token_client
        self.raise_on_rejection = raise_on_rejection
        self.cross_origin_redirects: RedirectPolicy = cross_origin_redirects
        self._loop_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._other_lock: anyio.Lock | None = None

    def __repr__(self) -> str:
        return f"DPoPAuth({self.token_client!r})"

    # --- the one flow ---------------------------------------------------------------------

    def _stamp(self, request: httpx.Request, token_type: str, access_token: str) -> str | None:
        url = str(request.url)
        nonce = self.token_client.nonces.get(url)
        request.headers["Authorization"] = f"{token_type} {access_token}"
        request.headers["DPoP"] = self.token_client.proofs.create(
            request.method, url, access_token=access_token, nonce=nonce
        )
        _log_sent(request)
        return nonce

    def _observe(self, response: httpx.Response) -> str | None:
        _log_received(response)
        return self.token_client.nonces.observe(
            str(response.request.url), response.headers.multi_items()
        )

    def _flow(self, request: httpx.Request) -> Generator[_Op, Any, None]:
        require_https(str(request.url), "resource URL")  # before any token is fetched or sent
        token: Token = yield _NEED_TOKEN
        sent_nonce = self._stamp(request, token.token_type, token.access_token)
        response: httpx.Response = yield request
        nonce = self._observe(response)
        self._check_redirects(request, response)
        if response.status_code not in (401, 403):
            return
        challenge = find_challenge(
            header_values(response.headers.multi_items(), "www-authenticate"), "DPoP"
        )
        if challenge is None:
            return
        error = challenge.params.get("error")
        replayable = isinstance(request.stream, httpx.ByteStream)
        retry = False
        if response.status_code == 401 and error == "use_dpop_nonce":
            if nonce is None:
                raise NonceError("use_dpop_nonce without a DPoP-Nonce header (RFC 9449 §9)")
            if nonce == sent_nonce:
                raise NonceError("the resource server handed back the nonce it just rejected")
            retry = replayable
        elif response.status_code == 401 and error == "invalid_token" and replayable:
            self.token_client.invalidate(token)
            token = yield _NEED_TOKEN
            retry = True
        if retry:
            self._stamp(request, token.token_type, token.access_token)
            response = yield request
            self._observe(response)
            self._check_redirects(request, response)
            challenge = find_challenge(
                header_values(response.headers.multi_items(), "www-authenticate"), "DPoP"
            )
            if challenge is None or response.status_code not in (401, 403):
                return
            error = challenge.params.get("error")
            if error == "use_dpop_nonce":
                raise NonceError("the resource server rejected our nonce again (RFC 9449 §9)")
        if self.raise_on_rejection and error:
            why = "" if replayable else " (body not replayable, no retry)"
            raise UnauthorizedError(
                f"resource server rejected the request{why}",
                error=error,
                error_description=challenge.params.get("error_description"),
                status=response.status_code,
            )

    def _check_redirects(self, request: httpx.Request, response: httpx.Response) -> None:
        final = response.request
        if final is not request and not final.extensions.get(_EXT):
            raise RedirectError(
                "httpx followed a redirect with a stale DPoP proof; call DPoPAuth.attach(client) "
                "so redirects are re-signed or stripped"
            )

    # --- sync driver ----------------------------------------------------------------------

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        return self.sync_auth_flow(request)

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        flow = self._flow(request)
        done, op = _advance(flow, None)
        while not done:
            if isinstance(op, _NeedToken):
                value: Any = yield from self._sync_token()
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
                    sent = _to_httpx(step, tc.timeout)
                    response = yield sent
                    _refuse_redirected(response, sent)
                    _read_bounded(response)
                    _log_sent(sent)
                    _log_received(response)
                    done, step = _advance(tflow, _from_httpx(response, step.url))
                token: Token = step
                return token
            except DPoPError as e:
                return _fallback(got, e)

    # --- async driver ---------------------------------------------------------------------

    def _async_lock(self) -> asyncio.Lock | anyio.Lock:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): one anyio lock
            if self._other_lock is None:
                self._other_lock = anyio.Lock()
            return self._other_lock
        lock = self._loop_locks.get(loop)
        if lock is None:
            lock = self._loop_locks.setdefault(loop, asyncio.Lock())
        return lock

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        flow = self._flow(request)
        run = anyio.to_thread.run_sync
        done, op = await run(_advance, flow, None)
        tc = self.token_client
        while not done:
            value: Any
            if isinstance(op, _NeedToken):
                value = tc.cached_token()
                if value is None:
                    async with self._async_lock():
                        cached = tc.cached_token()
                        got: Token | Renewal = (
                            cached if cached is not None else await run(tc.acquire)
                        )
                        if isinstance(got, Token):
                            value = got
                        else:
                            with got:
                                try:
                                    tflow = got.flow()
                                    t_done, step = await run(_advance, tflow, None)
                                    while not t_done:
                                        sent = _to_httpx(step, tc.timeout)
                                        response = yield sent
                                        _refuse_redirected(response, sent)
                                        await _aread_bounded(response)
                                        _log_sent(sent)
                                        _log_received(response)
                                        parsed = _from_httpx(response, step.url)
                                        t_done, step = await run(_advance, tflow, parsed)
                                    value = step
                                except DPoPError as e:
                                    value = _fallback(got, e)
            else:
                value = yield op
            done, op = await run(_advance, flow, value)

    # --- redirects ------------------------------------------------------------------------

    def attach(self, client: httpx.Client | httpx.AsyncClient) -> None:
        """Use this auth on ``client`` and re-sign / strip redirect hops (pitfall 14)."""
        client.auth = self
        if isinstance(client, httpx.AsyncClient):
            hooks = client.event_hooks
            hooks["request"] = [*hooks.get("request", []), self._async_redirect_hook]
            client.event_hooks = hooks
        else:
            hooks = client.event_hooks
            hooks["request"] = [*hooks.get("request", []), self.redirect_hook]
            client.event_hooks = hooks

    def _hop_action(self, request: httpx.Request) -> Callable[[], None] | None:
        proof = request.headers.get("DPoP")
        ext = request.extensions
        if proof is None or ext.get(_SENT) != proof:
            # First send of this request (redirect requests copy the extensions, so a hop
            # still carrying the proof recorded here is recognized below, even to the same URL).
            if proof is not None:
                request.extensions = {**ext, _SENT: proof}
            return None
        url = str(request.url)
        if ext.get(_TOKEN_REQUEST):
            # RFC 6749 §3.2 gives the token endpoint no redirects; following one would re-send
            # the client secret / assertion to wherever it points.
            raise RedirectError(f"the token endpoint redirected to {origin_of(url)}; not followed")
        target = _proof_target(proof)
        request.extensions = {**ext, _EXT: "redirect"}
        authz = request.headers.get("Authorization", "")
        scheme, _, access_token = authz.partition(" ")
        del request.headers["DPoP"]
        old_origin = origin_of(target[1]) if target is not None else None
        if old_origin == origin_of(url) and scheme.lower() in ("dpop", "bearer") and access_token:
            require_https(url, "redirect target")

            def restamp() -> None:
                self._stamp(request, scheme, access_token)
                request.extensions = {**request.extensions, _SENT: request.headers["DPoP"]}

            return restamp
        if scheme.lower() == "dpop":
            del request.headers["Authorization"]
        if self.cross_origin_redirects == "refuse":
            raise RedirectError(
                f"refusing to follow a redirect from {old_origin} to {origin_of(url)} with DPoP "
                "credentials"
            )
        return None

    def redirect_hook(self, request: httpx.Request) -> None:
        """httpx request event hook (``Client``): runs before every hop is sent."""
        action = self._hop_action(request)
        if action is not None:
            action()

    async def _async_redirect_hook(self, request: httpx.Request) -> None:
        action = self._hop_action(request)
        if action is not None:
            await anyio.to_thread.run_sync(action)


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
    """A failed renewal keeps the still-valid previous token in use; otherwise re-raise.

    A redirected token endpoint is never papered over: that is an attack or a misconfiguration.
    """
    if isinstance(error, RedirectError):
        raise error
    previous = renewal.previous
    if previous is not None and previous.is_valid():
        return previous
    raise error
