"""The default :data:`~dpop_hsm.sansio.Sender`: one sans-IO request through a ``requests`` session.

Private: the token client uses it when no adapter hands it a sender of its own, and the
requests adapter sends token requests through the caller's session with it. It sits below
both (it imports neither), so the token core never imports an adapter.

A hostile or broken server must not hold a token renewal — and every request waiting for it —
for long. ``timeout`` is (connect, read) per socket operation, as in requests; on top of that
the whole exchange, response header lines included, must finish within connect + 2 x read
seconds. urllib3 can only bound each ``recv``, and a server dripping one header byte at a time
resets that bound forever, so the exchange runs in a worker thread and the caller stops waiting
at the deadline; the worker closes what it got as soon as it can.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import requests
import urllib3
from requests.models import PreparedRequest, Response

from .errors import TransportError
from .htu import origin_of
from .logs import log_request, log_response
from .sansio import HttpRequest, HttpResponse

__all__ = ["MAX_RESPONSE_BODY", "RequestsTransportError", "response_headers", "send_http_request"]

MAX_RESPONSE_BODY = 1024 * 1024


class RequestsTransportError(TransportError, requests.exceptions.ConnectionError):
    """A token request that could not be completed, catchable both ways.

    As :class:`~dpop_hsm.errors.TransportError` (a ``DPoPError``) for code that handles our
    errors, and as ``requests.RequestException`` for code that already catches what requests
    raises: a failing token fetch inside ``session.get()`` should not need a new except clause.
    """


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


def _read_body(response: Response, deadline: float, url: str) -> bytes:
    """At most MAX_RESPONSE_BODY + 1 bytes, in whatever pieces arrive, before ``deadline``.

    A response hook of the caller's session may already have read the body (``r.content``):
    then that body is the one we parse, never a second, empty read of the drained stream.
    """
    content: object = response._content  # False until someone reads the body
    if getattr(response, "_content_consumed", False) or content is not False:
        return response.content or b""
    raw = response.raw
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_RESPONSE_BODY:
        if time.monotonic() > deadline:
            raise RequestsTransportError(f"{origin_of(url)} did not send its response in time")
        chunk = raw.read1(MAX_RESPONSE_BODY + 1 - size, decode_content=True)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    body = b"".join(chunks)
    # Later readers of this Response (hooks of an outer session, a debugger) see the same bytes.
    response._content = body
    setattr(response, "_content_consumed", True)  # noqa: B010 - requests keeps no typed attr
    return body


class _HungExchanges:
    """Abandoned exchanges still held open by a server, per origin.

    A worker abandoned at the deadline lives until the server finishes or the per-read timeout
    ends it; a server that drips bytes forever could otherwise cost one thread and one socket
    per renewal attempt. Past ``MAX_HUNG_PER_ORIGIN`` such workers, new requests to that
    origin fail at once instead of adding more.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count: dict[str, int] = {}

    def add(self, origin: str) -> None:
        with self._lock:
            self._count[origin] = self._count.get(origin, 0) + 1

    def release(self, origin: str) -> None:
        with self._lock:
            left = self._count.get(origin, 1) - 1
            if left > 0:
                self._count[origin] = left
            else:
                self._count.pop(origin, None)

    def full(self, origin: str) -> bool:
        with self._lock:
            return self._count.get(origin, 0) >= MAX_HUNG_PER_ORIGIN


MAX_HUNG_PER_ORIGIN = 4
_hung = _HungExchanges()


class _Exchange:
    """One request/response in a worker thread; the caller waits at most until ``deadline``."""

    def __init__(self, session: requests.Session, request: HttpRequest, timeout: Any) -> None:
        self._origin = origin_of(request.url)
        self._session = session
        self._request = request
        self._timeout = timeout
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._abandoned = False
        self.response: Response | None = None
        self.body = b""
        self.error: BaseException | None = None

    def run(self, deadline: float) -> None:
        try:
            self._run(deadline)
        finally:
            with self._lock:
                if self._abandoned:
                    _hung.release(self._origin)

    def _run(self, deadline: float) -> None:
        try:
            response = self._session.request(
                self._request.method,
                self._request.url,
                headers=dict(self._request.headers),
                data=self._request.body,
                auth=_no_auth,
                timeout=self._timeout,
                allow_redirects=False,
                stream=True,
            )
        except BaseException as e:
            self.error = e
            self._done.set()
            return
        with self._lock:
            abandoned = self._abandoned
        if abandoned:
            response.close()
            return
        try:
            self.body = _read_body(response, deadline, self._request.url)
        except BaseException as e:
            self.error = e
        finally:
            response.close()
        self.response = response
        self._done.set()

    def wait(self, deadline: float) -> bool:
        finished = self._done.wait(max(0.0, deadline - time.monotonic()))
        if not finished:
            with self._lock:
                if not self._done.is_set():
                    self._abandoned = True
                    _hung.add(self._origin)
                else:
                    finished = True
        return finished


def send_http_request(
    session: requests.Session,
    request: HttpRequest,
    *,
    timeout: tuple[float, float],
    deadline: float | None = None,
) -> HttpResponse:
    """Send a sans-IO request through ``session`` (its proxies, TLS, adapters, cookies apply).

    ``deadline`` (a ``time.monotonic()`` value) ends the exchange earlier than ``timeout``
    would: a caller's own bound, such as the end of an interactive login.

    Raises :class:`TransportError` on connection errors, timeouts and a missed total deadline
    (module docstring); never follows redirects.
    """
    now = time.monotonic()
    if deadline is not None and now >= deadline:
        raise RequestsTransportError(f"{origin_of(request.url)}: the caller's deadline passed")
    own = now + timeout[0] + 2 * timeout[1]
    deadline = own if deadline is None else min(own, deadline)
    if _hung.full(origin_of(request.url)):
        raise RequestsTransportError(
            f"{origin_of(request.url)}: {MAX_HUNG_PER_ORIGIN} earlier requests still hang there"
        )
    exchange = _Exchange(session, request, timeout)
    worker = threading.Thread(
        target=exchange.run, args=(deadline,), name="dpop_hsm-token-request", daemon=True
    )
    worker.start()
    origin = origin_of(request.url)
    if not exchange.wait(deadline):
        raise RequestsTransportError(f"{origin} did not send its response in time")
    error = exchange.error
    if isinstance(error, requests.exceptions.RequestException) and exchange.response is None:
        raise RequestsTransportError(f"cannot reach {origin}: {type(error).__name__}") from error
    # urllib3 raises its own ProtocolError (IncompleteRead) when the server drops mid-body.
    if isinstance(
        error,
        requests.exceptions.RequestException | urllib3.exceptions.HTTPError | OSError | ValueError,
    ):
        raise RequestsTransportError(f"reading the response from {origin} failed") from error
    if isinstance(error, TransportError):
        raise error
    if error is not None:
        raise error
    response = exchange.response
    assert response is not None
    prepared = response.request
    log_request(
        prepared.method or request.method, request.url, prepared.headers.items(), request.body
    )
    headers = response_headers(response)
    body = exchange.body
    log_response(response.status_code, response.reason or "", headers, body, url=request.url)
    return HttpResponse(response.status_code, tuple(headers), body, request.url)
