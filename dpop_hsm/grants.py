"""The developer-login grants on the :class:`~dpop_hsm.token_endpoint.Grant` seam.

* :class:`AuthorizationCodeGrant` — RFC 6749 §4.1.3 with the PKCE verifier (RFC 7636 §4.5);
  the proof on the request must come from the key named by ``dpop_jkt`` (RFC 9449 §10).
  Single use: a code is redeemed once (RFC 6749 §4.1.2), so the grant refuses to build a
  second request after a successful one.
* :class:`RefreshTokenGrant` — RFC 6749 §6 with a proof from the same key (RFC 9449 §5).
  Rotation (RFC 9700 §4.14.2): a response carrying a new refresh token replaces the old one in
  :meth:`~RefreshTokenGrant.accept`, which runs before the access token is used, and
  ``on_rotate`` lets the owner persist it first.
* :class:`DeviceCodeGrant` — RFC 8628 §3.4; the poll rules live in :mod:`dpop_hsm.device`.

Each grant reports the secrets it sends (code, verifier, refresh token, device code) so server
text echoing them is redacted before it reaches an exception.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from . import _fork
from .device import DEVICE_CODE_GRANT
from .errors import ConfigurationError, TokenResponseError
from .pkce import validate_verifier
from .token_endpoint import Grant, TokenResponse

__all__ = ["AuthorizationCodeGrant", "DeviceCodeGrant", "RefreshTokenGrant"]


def _resources(resource: str | Sequence[str] | None) -> tuple[str, ...]:
    if isinstance(resource, str):
        return (resource,)
    return tuple(resource or ())


MAX_VALUE = 65536  # characters: far beyond any real code or token, small enough to store


def _check_value(value: str, what: str) -> str:
    if not isinstance(value, str) or not value or not value.isprintable() or len(value) > MAX_VALUE:
        raise ConfigurationError(f"{what} must be a non-empty printable string")
    return value


class AuthorizationCodeGrant(Grant):
    """Redeem an authorization code (RFC 6749 §4.1.3, RFC 7636 §4.5, RFC 8707 §2)."""

    grant_type = "authorization_code"

    def __init__(
        self,
        *,
        code: str,
        redirect_uri: str,
        code_verifier: str,
        resource: str | Sequence[str] | None = None,
        scope: str | None = None,
    ) -> None:
        self._code = _check_value(code, "code")
        self.redirect_uri = _check_value(redirect_uri, "redirect_uri")
        self._verifier = validate_verifier(code_verifier)
        self.resource = _resources(resource)
        self._scope = scope  # what was asked for: the token's scope when the AS omits it
        self._redeemed = False

    @property
    def scope(self) -> str | None:
        return self._scope

    def parameters(self) -> list[tuple[str, str]]:
        if self._redeemed:
            raise ConfigurationError("an authorization code is single use (RFC 6749 §4.1.2)")
        pairs = [
            ("code", self._code),
            ("redirect_uri", self.redirect_uri),  # RFC 6749 §4.1.3: as in the request
            ("code_verifier", self._verifier),
        ]
        pairs += [("resource", r) for r in self.resource]
        return pairs

    def accept(self, response: TokenResponse) -> None:
        self._redeemed = True

    def secrets(self) -> list[str]:
        return [self._code, self._verifier]

    def __repr__(self) -> str:
        return f"AuthorizationCodeGrant(redirect_uri={self.redirect_uri!r}, code='****')"


class RefreshTokenGrant(Grant):
    """Use a refresh token (RFC 6749 §6); keeps the rotated one (RFC 9700 §4.14.2).

    ``scope`` is only sent when given (RFC 6749 §6: omitted means "as originally granted");
    ``on_rotate`` is called with the new refresh token before the access token is handed out.
    Thread-safe: the current refresh token is read and replaced under a lock.
    """

    grant_type = "refresh_token"

    def __init__(
        self,
        refresh_token: str,
        *,
        scope: str | None = None,
        resource: str | Sequence[str] | None = None,
        send_scope: bool = False,
        on_rotate: Callable[[str, TokenResponse], None] | None = None,
    ) -> None:
        self._refresh_token = _check_value(refresh_token, "refresh_token")
        self._scope = scope or None
        self._send_scope = send_scope
        self.resource = _resources(resource)
        self.on_rotate = on_rotate
        self._lock = threading.Lock()
        _fork.register(self)

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock (a parent thread may have held it at fork time)."""
        self._lock = threading.Lock()

    @property
    def scope(self) -> str | None:
        return self._scope

    @property
    def refresh_token(self) -> str:
        with self._lock:
            return self._refresh_token

    def replace(self, refresh_token: str) -> None:
        """Adopt a refresh token another process rotated in (read from the profile)."""
        with self._lock:
            self._refresh_token = _check_value(refresh_token, "refresh_token")

    def parameters(self) -> list[tuple[str, str]]:
        pairs = [("refresh_token", self.refresh_token)]
        if self._send_scope and self._scope:
            pairs.append(("scope", self._scope))
        pairs += [("resource", r) for r in self.resource]
        return pairs

    def accept(self, response: TokenResponse) -> None:
        """Adopt the rotated refresh token, if any, and hand it to ``on_rotate``.

        A rotated token longer than :data:`MAX_VALUE` is refused (TokenResponseError) before
        it is kept or persisted: :meth:`replace` and the constructor refuse it too, so
        adopting it would store a profile that no later process could load.
        """
        new = response.refresh_token
        if new is None:  # no rotation: the old refresh token stays valid (RFC 6749 §6)
            return
        if len(new) > MAX_VALUE:
            raise TokenResponseError(
                f"the rotated refresh_token is longer than {MAX_VALUE} characters"
            )
        with self._lock:
            self._refresh_token = new
        if self.on_rotate is not None:
            self.on_rotate(new, response)

    def secrets(self) -> list[str]:
        return [self.refresh_token]

    def __repr__(self) -> str:
        return f"RefreshTokenGrant(scope={self._scope!r}, refresh_token='****')"


class DeviceCodeGrant(Grant):
    """Poll with a device code (RFC 8628 §3.4)."""

    grant_type = DEVICE_CODE_GRANT

    def __init__(
        self,
        device_code: str,
        *,
        scope: str | None = None,
        resource: str | Sequence[str] | None = None,
    ) -> None:
        self._device_code = _check_value(device_code, "device_code")
        self._scope = scope or None
        self.resource = _resources(resource)

    @property
    def scope(self) -> str | None:
        return self._scope

    def parameters(self) -> list[tuple[str, str]]:
        pairs = [("device_code", self._device_code)]
        pairs += [("resource", r) for r in self.resource]
        return pairs

    def secrets(self) -> list[str]:
        return [self._device_code]

    def __repr__(self) -> str:
        return "DeviceCodeGrant(device_code='****')"
