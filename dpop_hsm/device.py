"""The device authorization grant's client logic (RFC 8628), sans-IO.

:func:`parse_device_authorization` validates the device authorization response (§3.2);
:class:`DevicePoller` is the polling state machine of §3.4-§3.5: it says how long to wait
before each token request and turns each token error into "keep polling" or a typed error.
The driver (``dpop_hsm.login``) sleeps, sends the token request with a fresh DPoP proof and
nonce retry, and reports back. Time comes from an injectable monotonic clock, so the rules are
tested without sleeping.

Rules (RFC 8628):

* §3.2: ``interval`` defaults to 5 s; ``expires_in`` is required and bounds the whole flow.
* §3.5: ``authorization_pending`` — poll again after ``interval``; ``slow_down`` — the
  interval grows by 5 s for this and every later request; ``access_denied`` and
  ``expired_token`` end the flow; a connection timeout doubles the interval (exponential
  backoff, "SHOULD").
* No poll is sent once the device code would be expired by the time it is due, nor after the
  caller's own login deadline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .discovery import check_endpoint
from .errors import (
    DeviceAccessDeniedError,
    DeviceCodeExpiredError,
    DeviceFlowError,
    DPoPError,
    LoginTimeoutError,
    OAuthError,
)
from .sansio import HttpResponse
from .strict_json import StrictJsonError, loads_strict
from .token_endpoint import redact

__all__ = [
    "DEFAULT_INTERVAL",
    "DEVICE_CODE_GRANT",
    "SLOW_DOWN_STEP",
    "DeviceAuthorization",
    "DevicePoller",
    "parse_device_authorization",
    "user_instructions",
]

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"  # RFC 8628 §3.4
DEFAULT_INTERVAL = 5.0  # RFC 8628 §3.2
SLOW_DOWN_STEP = 5.0  # RFC 8628 §3.5
MIN_INTERVAL = 1.0
MAX_INTERVAL = 300.0
MAX_EXPIRES_IN = 86400.0
_MAX_RESPONSE = 64 * 1024
# JSON integers have no size limit and float() overflows past ~1.8e308: clamp before converting.
_HUGE_SECONDS = 10**12


@dataclass(frozen=True)
class DeviceAuthorization:
    """A device authorization response (RFC 8628 §3.2). ``repr`` hides the device code.

    ``user_code`` and the URIs are shown to the user; they were checked to be printable and the
    URIs to be ``https`` (``http`` only for a loopback test server).
    """

    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    expires_in: float
    interval: float = DEFAULT_INTERVAL
    verification_uri_complete: str | None = None


def _seconds(value: Any, member: str, *, default: float | None) -> float:
    if value is None:
        if default is None:
            raise DeviceFlowError(f"the device authorization response has no {member}")
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DeviceFlowError(f"the device authorization response's {member} is not a number")
    seconds = float(min(value, _HUGE_SECONDS) if isinstance(value, int) else value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise DeviceFlowError(f"the device authorization response's {member} must be positive")
    return seconds


def _display_text(value: Any, member: str, limit: int) -> str:
    if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
        raise DeviceFlowError(
            f"the device authorization response's {member} is not a short printable string"
        )
    return value


def _not_a_secret(value: str, member: str, secrets: Sequence[str]) -> str:
    """``value`` unless it repeats one of our secrets: it is about to be printed for the user
    (and into CI logs), and an AS echoing the client secret there must not get it shown."""
    if redact(value, secrets) != value:
        raise DeviceFlowError(
            f"the device authorization response's {member} repeats a secret of this client; "
            "not shown"
        )
    return value


def parse_device_authorization(
    response: HttpResponse, *, issuer: str, secrets: Sequence[str] = ()
) -> DeviceAuthorization:
    """A :class:`DeviceAuthorization` from the device endpoint's answer, or a typed error.

    Raises :class:`OAuthError` for an OAuth error response (RFC 8628 §3.2, RFC 6749 §5.2; its
    text redacted of ``secrets``, what the request carried: the client secret or assertion)
    and :class:`DeviceFlowError` for an unusable body, a value meant for the user's screen
    that repeats one of ``secrets``, or numbers that are not positive; ``issuer`` decides
    whether plain-http verification URIs are acceptable (only for a loopback test issuer).
    """
    if len(response.body) > _MAX_RESPONSE:
        raise DeviceFlowError("the device authorization response is too large")
    strict = True
    try:
        parsed = loads_strict(response.body) if response.body else None
    except StrictJsonError:
        parsed, strict = None, False
    if response.status != 200:
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
            description = parsed.get("error_description")
            raise OAuthError(
                "device authorization request rejected",
                error=redact(parsed["error"], secrets),
                error_description=redact(description, secrets)
                if isinstance(description, str)
                else None,
                status=response.status,
            )
        raise DeviceFlowError(f"the device authorization endpoint answered HTTP {response.status}")
    if not strict:
        raise DeviceFlowError(
            "the device authorization response is not strict JSON (RFC 8259: UTF-8, unique "
            "member names, finite numbers)"
        )
    if not isinstance(parsed, dict):
        raise DeviceFlowError("the device authorization response is not a JSON object")
    device_code = parsed.get("device_code")
    if (
        not isinstance(device_code, str)
        or not 0 < len(device_code) <= 4096
        or not device_code.isascii()
        or not device_code.isprintable()
    ):
        raise DeviceFlowError("the device authorization response has no usable device_code")
    user_code = _display_text(parsed.get("user_code"), "user_code", 64)
    _not_a_secret(user_code, "user_code", secrets)
    try:
        uri = check_endpoint(parsed.get("verification_uri"), "verification_uri", issuer=issuer)
        complete = parsed.get("verification_uri_complete")
        if complete is not None:
            complete = check_endpoint(complete, "verification_uri_complete", issuer=issuer)
    except DPoPError as e:  # the message quotes the URI: our secrets are masked in it
        reason = redact(e.message, secrets)
        raise DeviceFlowError(f"the device authorization response: {reason}") from e
    _not_a_secret(uri, "verification_uri", secrets)
    if complete is not None:
        _not_a_secret(complete, "verification_uri_complete", secrets)
    expires_in = _seconds(parsed.get("expires_in"), "expires_in", default=None)
    interval = _seconds(parsed.get("interval"), "interval", default=DEFAULT_INTERVAL)
    return DeviceAuthorization(
        device_code=device_code,
        user_code=user_code,
        verification_uri=uri,
        verification_uri_complete=complete,
        expires_in=min(expires_in, MAX_EXPIRES_IN),
        interval=min(interval, MAX_INTERVAL),
    )


class DevicePoller:
    """When to poll, and what each token error means (RFC 8628 §3.4, §3.5).

    ``started`` is the monotonic time the device authorization response arrived (the device
    code's ``expires_in`` counts from then); ``login_timeout`` is the caller's own bound.
    ``min_interval`` floors the AS's interval so a hostile ``interval`` cannot make us hammer
    it (tests against local servers may lower it).
    """

    def __init__(
        self,
        authorization: DeviceAuthorization,
        *,
        started: float | None = None,
        login_timeout: float | None = None,
        min_interval: float = MIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        start = clock() if started is None else started
        self.expires_at = start + authorization.expires_in
        self.login_deadline = math.inf if login_timeout is None else start + login_timeout
        self.login_timeout = login_timeout
        self.interval = max(authorization.interval, min_interval)
        self.polls = 0
        self._last_poll: float | None = None
        self._start = start

    def next_wait(self) -> float:
        """Seconds to wait before the next token request (0 if it is already due).

        Raises :class:`DeviceCodeExpiredError` when the device code will have expired by then
        and :class:`LoginTimeoutError` when it would be past the login deadline.
        """
        now = self._clock()
        base = self._start if self._last_poll is None else self._last_poll
        due = max(now, base + self.interval)
        if due >= self.expires_at:
            raise DeviceCodeExpiredError(
                "the device code expired before the login was approved (RFC 8628 §3.5); start again"
            )
        if due >= self.login_deadline:
            raise LoginTimeoutError(
                f"the login was not approved within {self.login_timeout:g} s; start again"
            )
        return due - now

    def polled(self) -> None:
        """Record that a token request was sent now (call right before sending it)."""
        self.polls += 1
        self._last_poll = self._clock()

    def on_error(self, error: OAuthError) -> None:
        """Digest a token error response: return to keep polling, or raise the end of the flow.

        ``authorization_pending`` keeps the interval, ``slow_down`` adds 5 s to it (for this and
        all later polls); ``access_denied`` raises :class:`DeviceAccessDeniedError`,
        ``expired_token`` :class:`DeviceCodeExpiredError`; any other error is re-raised.
        """
        code = error.error
        if code == "authorization_pending":
            return
        if code == "slow_down":
            self.interval = min(self.interval + SLOW_DOWN_STEP, MAX_INTERVAL)
            return
        if code == "access_denied":
            raise DeviceAccessDeniedError(
                "the login was denied on the verification page (RFC 8628 §3.5)"
            ) from error
        if code == "expired_token":
            raise DeviceCodeExpiredError(
                "the device code expired before the login was approved (RFC 8628 §3.5); start again"
            ) from error
        raise error

    def on_transport_error(self) -> None:
        """RFC 8628 §3.5: after a connection timeout, back off exponentially."""
        self.interval = min(self.interval * 2, MAX_INTERVAL)

    def __repr__(self) -> str:
        return f"DevicePoller(interval={self.interval:g}, polls={self.polls})"


def user_instructions(authorization: DeviceAuthorization) -> str:
    """What to tell the user, as plain text (the values were checked to be printable)."""
    return (
        f"To log in, open {authorization.verification_uri} and enter the code "
        f"{authorization.user_code}"
    )
