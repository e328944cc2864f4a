"""The native-app redirect (RFC 8252 §7.3): a one-shot HTTP listener on ``127.0.0.1``.

Two halves. :func:`parse_authorization_response` is the sans-IO decision: given the redirect's
query string and what we expect (``state``, the issuer, whether the AS promised ``iss``), it
returns the code or raises the typed error the response amounts to. :class:`LoopbackListener`
only drives I/O: it listens on the loopback interface, hands the first ``GET /callback`` to that
function, answers the browser with a short static page, and refuses everything after.

Rules, with their sources:

* RFC 8252 §7.3, §8.3: listen on the loopback IP literal (not ``localhost``, which may resolve
  elsewhere or to the other IP family); any port, ephemeral by default.
* Exactly one response is accepted. A wrong ``state``, a wrong or (when the AS supports RFC 9207)
  missing ``iss``, or ``error=…`` ends the attempt at once: nothing is redeemed and the user
  starts again. Later callbacks get a refusal page and change nothing.
* RFC 6749 §3.1: response parameters must not repeat; a repeated one is refused.
* The page never reflects anything from the request: ``error_description`` is attacker text
  (protocols: show sanitised, never as markup); it goes to the terminal through the error's
  sanitised message instead.
* Requests to other paths get 404 and do not count; so do requests whose ``Host`` is not this
  listener's address (a DNS-rebinding page cannot end the attempt from another origin name).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .errors import (
    AuthorizationRejectedError,
    AuthorizationResponseError,
    DPoPError,
    LoginTimeoutError,
    LoopbackListenerError,
    ResponseIssuerError,
    StateMismatchError,
)

__all__ = [
    "CALLBACK_PATH",
    "AuthorizationResponse",
    "LoopbackListener",
    "parse_authorization_response",
]

log = logging.getLogger("dpop_hsm.loopback")

CALLBACK_PATH = "/callback"
LOOPBACK_HOST = "127.0.0.1"
_MAX_FIELDS = 32
_MAX_VALUE = 4096
_SOCKET_TIMEOUT = 10.0  # a browser's idle pre-connection must not hold a handler forever

_PAGE = (
    "<!doctype html><html lang=en><meta charset=utf-8><title>dpop-hsm</title>"
    "<body style='font-family:sans-serif;margin:3em'><h1>{title}</h1><p>{text}</p></body></html>"
)
_SUCCESS_PAGE = _PAGE.format(
    title="Login complete", text="You can close this window and return to the terminal."
).encode()
_FAILURE_PAGE = _PAGE.format(
    title="Login failed", text="Return to the terminal for details, then start again."
).encode()
_REFUSED_PAGE = _PAGE.format(
    title="Already finished", text="This login attempt is already finished."
).encode()
_NOT_FOUND_PAGE = _PAGE.format(title="Not found", text="Nothing here.").encode()
_BAD_REQUEST_PAGE = _PAGE.format(title="Bad request", text="This request is not accepted.").encode()
_SECURITY_HEADERS = (
    ("Content-Type", "text/html; charset=utf-8"),
    ("Cache-Control", "no-store"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Connection", "close"),
)


@dataclass(frozen=True)
class AuthorizationResponse:
    """A successful authorization response (RFC 6749 §4.1.2). ``repr`` hides code and state."""

    code: str = field(repr=False)
    state: str = field(repr=False)
    iss: str | None = None


def _parameters(query: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(
            query,
            keep_blank_values=True,
            strict_parsing=False,
            encoding="utf-8",
            errors="strict",
            max_num_fields=_MAX_FIELDS,
        )
    except (ValueError, UnicodeDecodeError) as e:
        raise AuthorizationResponseError(
            "the authorization response's query string cannot be decoded"
        ) from e
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:  # RFC 6749 §3.1: parameters MUST NOT be included more than once
            raise AuthorizationResponseError(
                f"the authorization response repeats the parameter {name[:40]!r} (RFC 6749 §3.1)"
            )
        if len(value) > _MAX_VALUE and name in ("error_description", "error_uri"):
            value = value[:_MAX_VALUE]  # attacker text, only ever shown truncated anyway
        elif len(value) > _MAX_VALUE:
            raise AuthorizationResponseError(
                f"the authorization response parameter {name[:40]!r} is too long"
            )
        params[name] = value
    return params


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def parse_authorization_response(
    query: str, *, state: str, issuer: str, iss_required: bool
) -> AuthorizationResponse:
    """The code from a redirect's query string, or the typed error that ends the attempt.

    Checks in this order: ``state`` (RFC 6749 §10.12, exact, constant time), ``iss`` (RFC 9207
    §2.4: compared whenever present; required when ``iss_required``), ``error`` (RFC 6749
    §4.1.2.1), then ``code``. Raises :class:`StateMismatchError`, :class:`ResponseIssuerError`,
    :class:`AuthorizationRejectedError` (``error``/``error_description`` sanitised) or
    :class:`AuthorizationResponseError`; no message contains the code or the state.
    """
    if not state:
        raise StateMismatchError("no state was sent; refusing any response")
    params = _parameters(query)
    got_state = params.get("state")
    if got_state is None:
        raise StateMismatchError("the authorization response has no state (RFC 6749 §4.1.2)")
    if not _same(got_state, state):
        raise StateMismatchError(
            "the authorization response's state is not the one this login sent "
            "(RFC 6749 §10.12); nothing was redeemed"
        )
    iss = params.get("iss")
    if iss is not None and not _same(iss, issuer):
        raise ResponseIssuerError(
            "the authorization response comes from another issuer (RFC 9207 §2.4); "
            "nothing was redeemed"
        )
    if iss is None and iss_required:
        raise ResponseIssuerError(
            "the authorization response has no iss although the authorization server "
            "promises it (RFC 9207 §2.4); nothing was redeemed"
        )
    if "error" in params:
        raise AuthorizationRejectedError(
            "the authorization server refused the login",
            error=params["error"],
            error_description=params.get("error_description"),
        )
    code = params.get("code")
    if not code:
        raise AuthorizationResponseError("the authorization response has no code")
    if not code.isascii() or not code.isprintable():
        raise AuthorizationResponseError("the authorization code has characters it may not")
    return AuthorizationResponse(code=code, state=got_state, iss=iss)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = False  # never share the port with another listener
    listener: LoopbackListener


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = _SOCKET_TIMEOUT
    server_version = "dpop-hsm"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        # The standard handler passes the request line to some of these messages, and the
        # request line of a callback carries the authorization code: never log a query.
        shown = [str(a).split("?", 1)[0] + " ?…" if "?" in str(a) else a for a in args]
        log.debug("loopback listener: " + format, *shown)

    def _page(self, status: int, body: bytes) -> None:
        self.send_response_only(status)
        for name, value in _SECURITY_HEADERS:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # BaseHTTPRequestHandler's error page echoes the method and path: answer statically.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self._page(code, _BAD_REQUEST_PAGE if code != 404 else _NOT_FOUND_PAGE)

    def do_GET(self) -> None:
        target = urlsplit(self.path)
        if target.path != self.server.listener.path or self.path.startswith("//"):
            self._page(404, _NOT_FOUND_PAGE)
            return
        if not self.server.listener.host_matches(self.headers.get_all("Host") or []):
            self._page(400, _BAD_REQUEST_PAGE)
            return
        outcome = self.server.listener._deliver(target.query)
        self._page(
            *{"ok": (200, _SUCCESS_PAGE), "failed": (400, _FAILURE_PAGE)}.get(
                outcome, (409, _REFUSED_PAGE)
            )
        )

    def _not_allowed(self) -> None:
        if urlsplit(self.path).path == self.server.listener.path:
            self._page(405, _BAD_REQUEST_PAGE)
        else:
            self._page(404, _NOT_FOUND_PAGE)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _not_allowed  # noqa: N815


class LoopbackListener:
    """Listen on ``http://127.0.0.1:{port}/callback`` for one authorization response.

    ``port`` 0 (default) picks a free ephemeral port (RFC 8252 §7.3: the AS must accept any
    port for a loopback redirect). Use as a context manager; :meth:`wait` returns the code or
    raises the attempt's typed error (:class:`LoginTimeoutError` when nothing came in time).
    Raises :class:`LoopbackListenerError` when the port cannot be bound.
    """

    def __init__(
        self,
        *,
        state: str,
        issuer: str,
        iss_required: bool,
        port: int = 0,
        path: str = CALLBACK_PATH,
    ) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise LoopbackListenerError(f"redirect port must be 0-65535, not {port!r}")
        if not path.startswith("/") or "?" in path or "#" in path:
            raise LoopbackListenerError("redirect path must start with '/' and have no query")
        if not state:
            raise LoopbackListenerError("the listener needs the state the login sends")
        self.path = path
        self._state = state
        self._issuer = issuer
        self._iss_required = iss_required
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._finished = False
        self._result: AuthorizationResponse | DPoPError | None = None
        try:
            self._server = _Server((LOOPBACK_HOST, port), _Handler)
        except OSError as e:
            raise LoopbackListenerError(
                f"cannot listen on {LOOPBACK_HOST}:{port} for the redirect: {e.strerror}"
            ) from e
        self._server.listener = self
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"dpop-hsm-loopback-{self.port}",
            daemon=True,
        )
        self._thread.start()
        self._closed = False

    @property
    def redirect_uri(self) -> str:
        """The ``redirect_uri`` to register in the authorization request (RFC 8252 §7.3)."""
        return f"http://{LOOPBACK_HOST}:{self.port}{self.path}"

    def host_matches(self, hosts: list[str]) -> bool:
        """True when the request's one ``Host`` names this listener (RFC 9110 §7.2)."""
        return len(hosts) == 1 and hosts[0].strip().lower() in (
            f"{LOOPBACK_HOST}:{self.port}",
            f"localhost:{self.port}",
        )

    def _deliver(self, query: str) -> str:
        """Decide on one callback; ``"ok"``, ``"failed"`` or ``"refused"`` for the page."""
        with self._lock:
            if self._finished:
                log.warning("a further redirect to the login listener was refused")
                return "refused"
            self._finished = True
            try:
                self._result = parse_authorization_response(
                    query,
                    state=self._state,
                    issuer=self._issuer,
                    iss_required=self._iss_required,
                )
            except DPoPError as e:
                self._result = e
            self._done.set()
            return "failed" if isinstance(self._result, DPoPError) else "ok"

    def wait(self, timeout: float) -> AuthorizationResponse:
        """Block until the one callback arrived (or ``timeout`` seconds passed).

        Raises :class:`LoginTimeoutError`, or the callback's own typed error.
        """
        if not self._done.wait(max(0.0, timeout)):
            with self._lock:
                if not self._finished:
                    self._finished = True
                    raise LoginTimeoutError(
                        f"no redirect reached {self.redirect_uri} within {timeout:g} s; "
                        "start the login again"
                    )
        result = self._result
        if isinstance(result, DPoPError):
            raise result
        assert result is not None
        return result

    def close(self) -> None:
        """Stop listening; later connections are refused by the OS."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._finished = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> LoopbackListener:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoopbackListener(redirect_uri={self.redirect_uri!r}, finished={self._finished})"
