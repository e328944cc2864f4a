"""The device authorization grant's polling rules (RFC 8628 §3.2, §3.4, §3.5), without sleeping."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dpop_hsm.device import (
    DeviceAuthorization,
    DevicePoller,
    parse_device_authorization,
    user_instructions,
)
from dpop_hsm.errors import (
    DeviceAccessDeniedError,
    DeviceCodeExpiredError,
    DeviceFlowError,
    LoginError,
    LoginTimeoutError,
    OAuthError,
)
from dpop_hsm.sansio import HttpResponse

ISSUER = "https://as.example.com"


def body(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "device_code": "dc-0123456789",
        "user_code": "WDJB-MJHT",
        "verification_uri": "https://as.example.com/device",
        "verification_uri_complete": "https://as.example.com/device?user_code=WDJB-MJHT",
        "expires_in": 1800,
        "interval": 5,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def answer(document: Any, status: int = 200) -> HttpResponse:
    return HttpResponse(status, (), json.dumps(document).encode())


def test_parse_rfc8628_example() -> None:
    auth = parse_device_authorization(answer(body()), issuer=ISSUER)
    assert auth.user_code == "WDJB-MJHT" and auth.expires_in == 1800 and auth.interval == 5
    assert auth.verification_uri_complete is not None
    assert "dc-0123456789" not in repr(auth)
    assert user_instructions(auth) == (
        "To log in, open https://as.example.com/device and enter the code WDJB-MJHT"
    )


def test_interval_defaults_to_five_seconds() -> None:
    auth = parse_device_authorization(answer(body(interval=_DROP)), issuer=ISSUER)
    assert auth.interval == 5.0


@pytest.mark.parametrize(
    "changes",
    [
        {"device_code": _DROP},
        {"device_code": ""},
        {"device_code": "é"},
        {"device_code": 5},
        {"user_code": _DROP},
        {"user_code": "\x1b[2Jowned"},
        {"user_code": "x" * 65},
        {"verification_uri": _DROP},
        {"verification_uri": "http://as.example.com/device"},  # plain http off loopback
        {"verification_uri": "javascript:alert(1)"},
        {"verification_uri_complete": "http://evil.example/device"},
        {"expires_in": _DROP},  # REQUIRED (§3.2)
        {"expires_in": 0},
        {"expires_in": -5},
        {"expires_in": "1800"},
        {"expires_in": True},
        {"interval": 0},
        {"interval": -1},
        {"interval": "5"},
    ],
)
def test_hostile_device_authorization_responses(changes: dict[str, Any]) -> None:
    with pytest.raises(DeviceFlowError):
        parse_device_authorization(answer(body(**changes)), issuer=ISSUER)


@pytest.mark.parametrize("raw", [b"", b"[]", b"{", b'{"a":1,"a":2}', b"\xff"])
def test_unparsable_device_responses(raw: bytes) -> None:
    with pytest.raises(DeviceFlowError):
        parse_device_authorization(HttpResponse(200, (), raw), issuer=ISSUER)


def test_device_endpoint_error_is_an_oauth_error() -> None:
    with pytest.raises(OAuthError) as info:
        parse_device_authorization(
            answer({"error": "invalid_client", "error_description": "\x00bad"}, 401),
            issuer=ISSUER,
        )
    assert info.value.error == "invalid_client" and "\x00" not in str(info.value)
    with pytest.raises(DeviceFlowError):
        parse_device_authorization(HttpResponse(500, ()), issuer=ISSUER)


@pytest.mark.parametrize("huge", [10**9, 10**400])  # 10**400: float() overflows
def test_huge_values_are_bounded(huge: int) -> None:
    auth = parse_device_authorization(answer(body(expires_in=huge, interval=huge)), issuer=ISSUER)
    assert auth.expires_in == 86400 and auth.interval == 300


def test_a_body_that_is_not_strict_json_says_so() -> None:
    with pytest.raises(DeviceFlowError, match="not strict JSON"):
        parse_device_authorization(HttpResponse(200, (), b'{"a":1,"a":2}'), issuer=ISSUER)


def test_secrets_are_masked_in_errors_and_never_shown() -> None:
    secret = "s3cret-of-the-client"
    echo = answer({"error": "invalid_client", "error_description": f"got {secret}"}, 401)
    with pytest.raises(OAuthError) as info:
        parse_device_authorization(echo, issuer=ISSUER, secrets=[secret])
    assert secret not in str(info.value) and "****" in str(info.value)
    with pytest.raises(DeviceFlowError, match="repeats a secret") as shown:
        parse_device_authorization(answer(body(user_code=secret)), issuer=ISSUER, secrets=[secret])
    assert secret not in str(shown.value)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def auth(expires_in: float = 60, interval: float = 5) -> DeviceAuthorization:
    return DeviceAuthorization(
        device_code="dc",
        user_code="U",
        verification_uri="https://as.example.com/d",
        expires_in=expires_in,
        interval=interval,
    )


def pending(code: str = "authorization_pending") -> OAuthError:
    return OAuthError("token request rejected", error=code, status=400)


def poll(poller: DevicePoller, clock: Clock) -> float:
    wait = poller.next_wait()
    clock.now += wait
    poller.polled()
    return wait


def test_pending_keeps_the_interval() -> None:
    clock = Clock()
    poller = DevicePoller(auth(), clock=clock)
    assert poll(poller, clock) == 5
    poller.on_error(pending())
    assert poll(poller, clock) == 5
    assert poller.polls == 2


def test_slow_down_adds_five_seconds_for_this_and_later_polls() -> None:
    clock = Clock()
    poller = DevicePoller(auth(expires_in=600), clock=clock)
    poll(poller, clock)
    poller.on_error(pending("slow_down"))
    assert poll(poller, clock) == 10
    poller.on_error(pending())
    assert poll(poller, clock) == 10  # stays increased
    poller.on_error(pending("slow_down"))
    assert poll(poller, clock) == 15


def test_time_already_spent_counts_against_the_wait() -> None:
    clock = Clock()
    poller = DevicePoller(auth(), clock=clock)
    poll(poller, clock)
    clock.now += 3  # the request itself took 3 s
    assert poller.next_wait() == 2
    clock.now += 10
    assert poller.next_wait() == 0


def test_terminal_errors() -> None:
    poller = DevicePoller(auth(), clock=Clock())
    with pytest.raises(DeviceAccessDeniedError) as denied:
        poller.on_error(pending("access_denied"))
    assert isinstance(denied.value, LoginError)
    with pytest.raises(DeviceCodeExpiredError):
        poller.on_error(pending("expired_token"))
    other = pending("invalid_client")
    with pytest.raises(OAuthError) as info:
        poller.on_error(other)
    assert info.value is other


def test_no_poll_after_the_device_code_expires() -> None:
    clock = Clock()
    poller = DevicePoller(auth(expires_in=12, interval=5), clock=clock)
    poll(poller, clock)  # t+5
    poller.on_error(pending())
    poll(poller, clock)  # t+10
    poller.on_error(pending())
    with pytest.raises(DeviceCodeExpiredError):  # t+15 would be past expires_in
        poller.next_wait()


def test_login_timeout_bounds_the_flow() -> None:
    clock = Clock()
    poller = DevicePoller(auth(expires_in=1800), login_timeout=8, clock=clock)
    poll(poller, clock)
    with pytest.raises(LoginTimeoutError):
        poller.next_wait()


def test_transport_errors_back_off_exponentially_and_stay_bounded() -> None:
    clock = Clock()
    poller = DevicePoller(auth(expires_in=86400), clock=clock)
    for _ in range(20):
        poller.on_transport_error()
    assert poller.interval == 300


def test_hostile_interval_is_floored() -> None:
    poller = DevicePoller(auth(interval=0.001), clock=Clock())
    assert poller.interval == 1.0
    assert DevicePoller(auth(interval=0.001), clock=Clock(), min_interval=0).interval == 0.001


def test_slow_down_loop_is_bounded_by_expiry() -> None:
    clock = Clock()
    poller = DevicePoller(auth(expires_in=600, interval=5), clock=clock)
    with pytest.raises(DeviceCodeExpiredError):
        for _ in range(1000):
            poll(poller, clock)
            poller.on_error(pending("slow_down"))
    assert poller.polls < 20
