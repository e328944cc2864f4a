"""``login(device=True)`` against a hostile authorization server, over real sockets.

The AS is a raw-socket server (``tests/support/raw_http.py``) that serves its metadata, then
answers the device authorization request and the polls however the test says: numbers no
float can hold, values meant for the screen that repeat our client secret, an error text
echoing it, a poll it never answers, ``slow_down`` on every poll. Each case ends in a typed
error or a bounded number of polls, within ``login_timeout``, and nothing printed or raised
carries the secret (RFC 8628 §3.2, §3.5; RFC 6749 §5.2).
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from dpop_hsm.errors import (
    DeviceAccessDeniedError,
    DeviceFlowError,
    DPoPError,
    LoginTimeoutError,
    OAuthError,
)
from dpop_hsm.login import login
from dpop_hsm.login_prompt import TerminalPrompt
from dpop_hsm.signers.software import SoftwareSigner
from tests.support.raw_http import RawServer, Seen, response

SECRET = "device-client-secret-7d2a"  # a fixture, checked for leaks
TokenAnswer = Callable[[Seen], bytes | None]  # None: never answer


@dataclass
class HostileAS:
    """Metadata, a device authorization answer and a token-endpoint behaviour, on a socket."""

    device: Callable[[str], tuple[int, dict[str, Any]]]
    token: TokenAnswer
    release: threading.Event = field(default_factory=threading.Event)
    polls: int = 0

    def __post_init__(self) -> None:
        self.server = RawServer(self._handle)

    @property
    def url(self) -> str:
        return self.server.url

    def _handle(self, seen: Seen, conn: Any, index: int) -> None:
        url = self.server.url
        if seen.path == "/.well-known/oauth-authorization-server":
            document = {
                "issuer": url,
                "token_endpoint": url + "/token",
                "device_authorization_endpoint": url + "/device_authorization",
            }
            self.server.send(conn, response(200, json.dumps(document).encode()))
        elif seen.path == "/device_authorization":
            status, body = self.device(url)
            self.server.send(conn, response(status, json.dumps(body).encode()))
        elif seen.path == "/token":
            self.polls += 1
            answer = self.token(seen)
            if answer is None:
                self.release.wait(600)  # hold the poll open until the test is over
                return
            self.server.send(conn, answer)
        else:
            self.server.send(conn, response(404))

    def close(self) -> None:
        self.release.set()
        self.server.close()


def device_answer(**changes: Any) -> Callable[[str], tuple[int, dict[str, Any]]]:
    def answer(url: str) -> tuple[int, dict[str, Any]]:
        body: dict[str, Any] = {
            "device_code": "dc-hostile-0123",
            "user_code": "WDJB-MJHT",
            "verification_uri": url + "/device",
            "expires_in": 600,
            "interval": 5,
        }
        body.update(changes)
        return 200, body

    return answer


def oauth_error(error: str) -> TokenAnswer:
    return lambda seen: response(400, json.dumps({"error": error}).encode())


@pytest.fixture
def hostile() -> Iterator[Callable[..., HostileAS]]:
    started: list[HostileAS] = []

    def start(device: Callable[[str], tuple[int, dict[str, Any]]], token: TokenAnswer) -> HostileAS:
        server = HostileAS(device, token)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture(scope="module")
def key() -> SoftwareSigner:
    return SoftwareSigner.generate("ES256")


@dataclass
class Run:
    error: DPoPError
    printed: str
    waits: list[float]


def run_login(key: SoftwareSigner, server: HostileAS, **options: Any) -> Run:
    """``login(device=True)`` as a confidential client; what it raised, printed and slept."""
    screen = io.StringIO()
    waits: list[float] = []
    options.setdefault("sleep", waits.append)  # the poller's clock is real: waits are asked
    options.setdefault("login_timeout", 60)
    with pytest.raises(DPoPError) as info:
        login(
            key,
            client_id="device-client",
            issuer=server.url,
            device=True,
            client_secret=SECRET,
            auth_method="client_secret_post",
            prompt=TerminalPrompt(open_browser=False, stream=screen),
            timeout=(5.0, 5.0),
            **options,
        )
    error = info.value
    assert SECRET not in str(error) and SECRET not in repr(error)
    assert SECRET not in screen.getvalue()
    return Run(error, screen.getvalue(), waits)


# --- numbers no float can hold --------------------------------------------------------------


def test_a_json_integer_beyond_the_float_range_is_bounded_not_a_crash(
    hostile: Callable[..., HostileAS], key: SoftwareSigner
) -> None:
    # float(10**400) raises OverflowError: it used to escape login() as a non-DPoPError.
    # expires_in is clamped to a day: the flow goes on to a poll, which the AS denies.
    server = hostile(device_answer(expires_in=10**400), oauth_error("access_denied"))
    run = run_login(key, server)
    assert isinstance(run.error, DeviceAccessDeniedError) and server.polls == 1
    assert "WDJB-MJHT" in run.printed
    # interval is clamped to 300 s: the first poll would come after the login deadline.
    server = hostile(device_answer(interval=10**400), oauth_error("authorization_pending"))
    run = run_login(key, server, login_timeout=30)
    assert isinstance(run.error, LoginTimeoutError) and server.polls == 0


@pytest.mark.parametrize(
    "changes",
    [
        {"interval": -5},
        {"interval": True},
        {"expires_in": 0.0},
        {"expires_in": None},
        {"device_code": None},
        {"verification_uri": "http://evil.example/device"},  # not https, not loopback
        {"verification_uri": "https://as.example/\x1b[2J"},
        {"user_code": "WDJB\u202eMJHT"},  # a bidi override in what the user reads
    ],
)
def test_unusable_device_authorizations_end_before_the_first_poll(
    hostile: Callable[..., HostileAS], key: SoftwareSigner, changes: dict[str, Any]
) -> None:
    server = hostile(device_answer(**changes), oauth_error("authorization_pending"))
    run = run_login(key, server)
    assert isinstance(run.error, DeviceFlowError) and server.polls == 0
    assert run.printed == ""  # nothing shown to the user from a response we refused


# --- our secret echoed back -------------------------------------------------------------------


def test_an_error_echoing_the_client_secret_is_redacted(
    hostile: Callable[..., HostileAS], key: SoftwareSigner
) -> None:
    def refuse(url: str) -> tuple[int, dict[str, Any]]:
        return 401, {"error": "invalid_client", "error_description": f"bad secret {SECRET}"}

    run = run_login(key, hostile(refuse, oauth_error("authorization_pending")))
    assert isinstance(run.error, OAuthError) and run.error.error == "invalid_client"
    assert "****" in str(run.error)


@pytest.mark.parametrize(
    "changes",
    [
        {"user_code": SECRET},
        {"verification_uri_complete": "https://as.example/device?c=" + SECRET},
        {"verification_uri": "http://evil.example/?" + SECRET},  # refused, and quoted
    ],
)
def test_a_secret_in_what_would_be_printed_is_never_shown(
    hostile: Callable[..., HostileAS], key: SoftwareSigner, changes: dict[str, Any]
) -> None:
    server = hostile(device_answer(**changes), oauth_error("authorization_pending"))
    run = run_login(key, server)
    assert isinstance(run.error, DeviceFlowError) and server.polls == 0


# --- polls that never end ---------------------------------------------------------------------


def test_a_poll_the_as_never_answers_ends_at_the_login_deadline(
    hostile: Callable[..., HostileAS], key: SoftwareSigner
) -> None:
    # The read timeout (600 s) is far past the login deadline and the suite's own timeout:
    # only the login deadline can end this poll.
    server = hostile(device_answer(interval=1), lambda seen: None)
    screen = io.StringIO()
    with pytest.raises(LoginTimeoutError):
        login(
            key,
            client_id="device-client",
            issuer=server.url,
            device=True,
            prompt=TerminalPrompt(open_browser=False, stream=screen),
            login_timeout=3,
            timeout=(5.0, 600.0),
            device_min_interval=0,
            sleep=lambda seconds: None,
        )
    assert server.polls == 1


def test_a_slow_down_storm_adds_five_seconds_per_poll_until_the_deadline(
    hostile: Callable[..., HostileAS], key: SoftwareSigner
) -> None:
    server = hostile(device_answer(interval=5), oauth_error("slow_down"))
    run = run_login(key, server, login_timeout=60)
    assert isinstance(run.error, LoginTimeoutError)
    # RFC 8628 §3.5: +5 s for this and every later poll; the sleeps are asked of us, the
    # poller's clock is real, so each wait is the interval less the few ms a poll took.
    assert [round(w) for w in run.waits] == list(range(5, 60, 5))
    assert server.polls == len(run.waits)
