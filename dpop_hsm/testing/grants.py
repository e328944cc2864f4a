"""The authorization server's memory of user grants: pushed requests, logins, codes, device
codes and refresh tokens, each single use where the RFCs say so, all behind one lock.

Values only; no HTTP here. Every lookup that consumes something does so atomically, so two
concurrent redemptions of one code or one refresh token cannot both succeed.
"""

from __future__ import annotations

import os
import secrets
import threading
from dataclasses import dataclass, field
from typing import Literal

from ..jose import b64url_encode

__all__ = [
    "AuthorizationRequest",
    "CodeRecord",
    "DeviceRecord",
    "Grant",
    "GrantStore",
    "RefreshResult",
]

# RFC 8628 §6.1: a short code from a consonant-only alphabet people can type and read aloud.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
REQUEST_URI_PREFIX = "urn:ietf:params:oauth:request_uri:"  # RFC 9126 §2.2

DeviceStatus = Literal["pending", "approved", "denied", "redeemed"]


def _opaque() -> str:
    return b64url_encode(os.urandom(32))


@dataclass(frozen=True)
class AuthorizationRequest:
    """A validated authorization request (RFC 6749 §4.1.1, RFC 7636 §4.3, RFC 9449 §10).

    ``redirect_uri`` is the URI exactly as the client sent it: the code goes there, and the
    token request must repeat it (RFC 6749 §4.1.3).
    """

    client_id: str
    redirect_uri: str
    scope: str
    state: str | None
    code_challenge: str
    dpop_jkt: str | None


@dataclass
class Grant:
    """One user's consent for one client: the access tokens and the refresh token it produced.

    ``jkt`` binds the refresh token of a public client to its DPoP key (RFC 9449 §5).
    """

    client_id: str
    user: str
    scope: str
    jkt: str | None
    access_jtis: set[str] = field(default_factory=set)
    refresh_token: str | None = None
    refresh_expires_at: float = 0.0
    retired: set[str] = field(default_factory=set)
    revoked: bool = False


@dataclass
class CodeRecord:
    """An authorization code: single use; once redeemed, it remembers the grant it started."""

    request: AuthorizationRequest
    user: str
    expires_at: float
    used: bool = False
    replayed: bool = False
    grant: Grant | None = None


@dataclass
class DeviceRecord:
    """A device authorization (RFC 8628 §3.2) and the state of its polling (§3.5)."""

    device_code: str
    user_code: str
    client_id: str
    scope: str
    expires_at: float
    interval: int
    status: DeviceStatus = "pending"
    user: str | None = None
    last_poll: float | None = None


@dataclass(frozen=True)
class RefreshResult:
    """What presenting a refresh token found: the live grant, or why there is none."""

    grant: Grant | None
    outcome: Literal["ok", "unknown", "reused", "revoked", "expired"]


def normalize_user_code(text: str) -> str:
    """RFC 8628 §6.1: compare case-insensitively, ignoring the dash and spaces people add."""
    return "".join(ch for ch in text.upper() if ch not in "- \t")


class GrantStore:
    """Thread-safe in-memory store; times are the servers' clock (seconds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pushed: dict[str, tuple[AuthorizationRequest, float]] = {}
        self._logins: dict[str, tuple[AuthorizationRequest, float]] = {}
        self._codes: dict[str, CodeRecord] = {}
        self._devices: dict[str, DeviceRecord] = {}
        self._user_codes: dict[str, str] = {}
        self._refresh: dict[str, Grant] = {}
        self._retired: dict[str, Grant] = {}

    # --- front channel ----------------------------------------------------------------------

    def push(self, request: AuthorizationRequest, expires_at: float) -> str:
        """Store a pushed authorization request (RFC 9126 §2.2); its ``request_uri``."""
        request_uri = REQUEST_URI_PREFIX + _opaque()
        with self._lock:
            self._pushed[request_uri] = (request, expires_at)
        return request_uri

    def pull(self, request_uri: str, client_id: str, now: float) -> AuthorizationRequest | None:
        """The pushed request, once (RFC 9126 §4); None if unknown, expired or another
        client's. An attempt by another client does not consume it."""
        with self._lock:
            entry = self._pushed.get(request_uri)
            if entry is None or entry[0].client_id != client_id:
                return None
            del self._pushed[request_uri]
        request, expires_at = entry
        return request if now < expires_at else None

    def begin_login(self, request: AuthorizationRequest, expires_at: float) -> str:
        """A one-time form token for the login and consent page of ``request``."""
        form_token = _opaque()
        with self._lock:
            self._logins[form_token] = (request, expires_at)
        return form_token

    def end_login(self, form_token: str, now: float) -> AuthorizationRequest | None:
        """The request behind a form token, consuming it; None if unknown, used or expired."""
        with self._lock:
            entry = self._logins.pop(form_token, None)
        if entry is None or now >= entry[1]:
            return None
        return entry[0]

    def issue_code(self, request: AuthorizationRequest, user: str, expires_at: float) -> str:
        code = _opaque()
        with self._lock:
            self._codes[code] = CodeRecord(request, user, expires_at)
        return code

    def redeem_code(self, code: str, client_id: str) -> tuple[CodeRecord | None, bool]:
        """(record, replayed): the code's record, marked used by this call, and whether it had
        been used before (RFC 6749 §4.1.2: a replay). An unknown code or another client's
        gives (None, False) and consumes nothing."""
        with self._lock:
            record = self._codes.get(code)
            if record is None or record.request.client_id != client_id:
                return None, False
            replayed = record.used
            record.used = True
            if replayed:
                record.replayed = True
        return record, replayed

    def attach_grant(self, record: CodeRecord, grant: Grant) -> bool:
        """Remember the grant a code started; False if the code was replayed meanwhile (the
        caller must then revoke what it just issued)."""
        with self._lock:
            record.grant = grant
            return not record.replayed

    # --- grants and refresh tokens ----------------------------------------------------------

    def new_refresh_token(
        self, grant: Grant, expires_at: float, *, replacing: str | None = None
    ) -> str | None:
        """Give ``grant`` a new refresh token; the previous one is retired (dead, but known,
        so a later use is recognized as reuse: RFC 9700 §4.14.2). With ``replacing``, only if
        that is still the grant's live token (None otherwise: a concurrent refresh won)."""
        token = _opaque()
        with self._lock:
            if grant.revoked or (replacing is not None and grant.refresh_token != replacing):
                return None
            if grant.refresh_token is not None:
                self._refresh.pop(grant.refresh_token, None)
                self._retired[grant.refresh_token] = grant
                grant.retired.add(grant.refresh_token)
            grant.refresh_token = token
            grant.refresh_expires_at = expires_at
            self._refresh[token] = grant
        return token

    def add_access_token(self, grant: Grant, jti: str) -> bool:
        """Record an access token issued from ``grant``; False if the grant was revoked
        meanwhile (the caller revokes the token)."""
        with self._lock:
            grant.access_jtis.add(jti)
            return not grant.revoked

    def find_refresh(self, token: str, now: float) -> RefreshResult:
        with self._lock:
            grant = self._refresh.get(token)
            if grant is None:
                retired = self._retired.get(token)
                if retired is not None:
                    return RefreshResult(retired, "reused")
                return RefreshResult(None, "unknown")
        if grant.revoked:
            return RefreshResult(grant, "revoked")
        if now >= grant.refresh_expires_at:
            return RefreshResult(grant, "expired")
        return RefreshResult(grant, "ok")

    def revoke_grant(self, grant: Grant) -> set[str]:
        """Kill the grant's refresh token; the access-token ``jti`` values to revoke with it."""
        with self._lock:
            grant.revoked = True
            if grant.refresh_token is not None:
                self._refresh.pop(grant.refresh_token, None)
            return set(grant.access_jtis)

    # --- device authorization ---------------------------------------------------------------

    def start_device(
        self, client_id: str, scope: str, expires_at: float, interval: int
    ) -> DeviceRecord:
        with self._lock:
            while True:
                raw = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(8))
                if raw not in self._user_codes:
                    break
            record = DeviceRecord(
                _opaque(), raw[:4] + "-" + raw[4:], client_id, scope, expires_at, interval
            )
            self._devices[record.device_code] = record
            self._user_codes[raw] = record.device_code
        return record

    def device_by_user_code(self, user_code: str, now: float) -> DeviceRecord | None:
        """The pending, unexpired device authorization a user typed the code of."""
        with self._lock:
            device_code = self._user_codes.get(normalize_user_code(user_code))
            record = self._devices.get(device_code) if device_code else None
        if record is None or record.status != "pending" or now >= record.expires_at:
            return None
        return record

    def decide_device(self, record: DeviceRecord, user: str | None, approve: bool) -> bool:
        """Approve or deny a pending device authorization; False if it was decided already."""
        with self._lock:
            if record.status != "pending":
                return False
            record.status = "approved" if approve else "denied"
            record.user = user
            return True

    def device(self, device_code: str) -> DeviceRecord | None:
        with self._lock:
            return self._devices.get(device_code)

    def poll(self, record: DeviceRecord, now: float) -> tuple[bool, DeviceStatus]:
        """Record one poll: (too fast, status). A poll sooner than ``interval`` after the
        previous one raises the interval by 5 s for good (RFC 8628 §3.5 ``slow_down``); an
        approved authorization turns ``redeemed`` on the poll that collects it."""
        with self._lock:
            too_fast = record.last_poll is not None and now - record.last_poll < record.interval
            record.last_poll = now
            if too_fast:
                record.interval += 5
                return True, record.status
            status = record.status
            if status == "approved":
                record.status = "redeemed"
            return False, status
