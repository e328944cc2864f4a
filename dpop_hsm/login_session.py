"""A logged-in session: a :class:`~dpop_hsm.token.TokenClient` that renews with its refresh token.

:class:`LoginSession` is what :func:`dpop_hsm.login.login` and :func:`load_profile` return.
It *is* a ``TokenClient`` — ``DPoPAuth``, ``DPoPSession`` and the httpx adapter work on it
unchanged — whose renewals run a :class:`~dpop_hsm.grants.RefreshTokenGrant` through the same
single-flight machinery (one renewal at a time however many threads ask).

With a profile, every renewal also holds the profile's inter-process lock from before the
refresh request until the rotated refresh token is on disk: a rotated refresh token kills the
old one (RFC 9700 §4.14.2), so two processes refreshing with the same old token would lose the
grant on servers that detect reuse. Under the lock the profile is re-read first: if another
process already refreshed, its refresh token (and, if still fresh, its access token) is adopted
instead of refreshing again. The new refresh token is written (atomically) before the access
token is handed out.

``invalid_grant`` on refresh (RFC 6749 §5.2) means the grant is over — expired, revoked, or the
refresh token is bound to another key (RFC 9449 §5): :class:`LoginRequiredError`, and the
profile forgets the dead refresh token so later runs say so without asking the AS.

Logout (RFC 7009): revoke the refresh token (``token_type_hint=refresh_token``), then the
access token; an AS answering ``unsupported_token_type`` for the access token has nothing to
revoke there and that is not an error; then the profile is deleted. A profile that a later
login replaced (another issuer or client) is never refreshed, revoked or deleted by this one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING

from .client_auth import ClientAuth, NoClientAuth, PrivateKeyJwt, SecretBasic, SecretPost
from .discovery import ServerMetadata
from .errors import (
    ConfigurationError,
    DPoPError,
    LoginRequiredError,
    OAuthError,
    ProfileError,
)
from .grants import RefreshTokenGrant
from .nonces import NonceStore
from .profiles import Profile, ProfileStore
from .proof import ProofFactory
from .revocation import LogoutResult, revocation_flow, run_flow
from .sansio import HttpRequest, HttpResponse, Sender
from .secret_sources import SecretSource
from .signers.base import Signer
from .token import DEFAULT_TIMEOUT, Renewal, TokenClient
from .token_endpoint import (
    DEFAULT_LIFETIME,
    Grant,
    Token,
    TokenResponse,
)

if TYPE_CHECKING:
    import requests as _requests

__all__ = [
    "LoginSession",
    "LogoutResult",
    "client_auth_from_profile",
    "load_profile",
    "logout",
    "revocation_flow",
    "run_flow",
    "token_from_profile",
]

log = logging.getLogger("dpop_hsm.login")


class _NoRefreshGrant(Grant):
    """Stands in when the AS issued no refresh token: renewing means logging in again."""

    grant_type = "refresh_token"

    def __init__(self, scope: str | None, resource: tuple[str, ...]) -> None:
        self._scope = scope
        self.resource = resource

    @property
    def scope(self) -> str | None:
        return self._scope

    def parameters(self) -> list[tuple[str, str]]:
        raise LoginRequiredError(
            "the access token expired and the authorization server issued no refresh token"
        )


def _wall_to_monotonic(wall: float) -> float:
    return time.monotonic() + (wall - time.time())


def token_from_profile(
    profile: Profile, *, renew_before: float | None = None, allow_bearer: bool = False
) -> Token | None:
    """The stored access token as a :class:`Token`, or None if absent, expired or unusable."""
    if not profile.access_token or profile.expires_at is None or not profile.token_type:
        return None
    if profile.token_type.lower() != "dpop" and not (
        allow_bearer and profile.token_type.lower() == "bearer"
    ):
        return None
    remaining = profile.expires_at - time.time()
    if remaining <= 0:
        return None
    lifetime = max(remaining, profile.expires_at - profile.updated_at)
    early = renew_before if renew_before is not None else min(60.0, lifetime / 10)
    expires_at = _wall_to_monotonic(profile.expires_at)
    return Token(
        access_token=profile.access_token,
        token_type=profile.token_type,
        expires_at=expires_at,
        renew_at=expires_at - min(early, lifetime),
        issued_at=profile.updated_at,
        lifetime=lifetime,
        jkt=profile.jkt,
        scope=profile.scope,
    )


def warn_if_bearer(client_id: str, token: Token) -> None:
    """Log an access token that is not DPoP-bound: only ``allow_bearer`` lets one through (the
    token endpoint refuses it otherwise, RFC 9449 §5), and that downgrade is never silent."""
    if not token.is_dpop:
        log.warning(
            "client %r: the authorization server issued a %s access token (not DPoP); "
            "accepted only because allow_bearer is set for this login",
            client_id,
            token.token_type[:20],
        )


def _expiry_wall(token: Token) -> float:
    return time.time() + token.expires_in()


class LoginSession(TokenClient):
    """A token client for one login: refresh-token renewal, an optional profile, logout.

    Built by :func:`dpop_hsm.login.login` and :func:`load_profile`; construct it directly only
    to resume a login from values kept elsewhere. ``refresh_token`` never shows in ``repr``.
    Raises, on renewal, :class:`LoginRequiredError` when the refresh token is refused
    (``invalid_grant``) or there is none, besides the errors of :class:`TokenClient`.
    """

    @property
    def renewal_blocks(self) -> bool:
        # A refresh waits for the profile's file lock and writes the rotated refresh token
        # with fsync: never on an event loop.
        return self.store is not None or super().renewal_blocks

    def __init__(
        self,
        signer: Signer,
        *,
        metadata: ServerMetadata,
        client_id: str,
        client_auth: ClientAuth,
        refresh_token: str | None,
        token: Token | None = None,
        scope: str | None = None,
        resource: Sequence[str] = (),
        allow_bearer: bool = False,
        profile: str | None = None,
        store: ProfileStore | None = None,
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
        renew_before: float | None = None,
        default_lifetime: float = DEFAULT_LIFETIME,
        nonce_store: NonceStore | None = None,
        proof_factory: ProofFactory | None = None,
        session: _requests.Session | None = None,
        lock_timeout: float = 30.0,
        owns_signer: bool = False,
    ) -> None:
        self.metadata = metadata
        self.issuer = metadata.issuer
        self.profile_name = profile
        self.store = store if store is not None or profile is None else ProfileStore()
        self._lock_timeout = lock_timeout
        self._dead_tokens: deque[str] = deque(maxlen=8)  # invalidated: never adopted again
        self._owns_signer = owns_signer
        resources = tuple(resource)
        grant: Grant
        if refresh_token:
            grant = RefreshTokenGrant(refresh_token, scope=scope, resource=resources)
        else:
            grant = _NoRefreshGrant(scope, resources)
        super().__init__(
            signer,
            token_endpoint=metadata.token_endpoint,
            client_id=client_id,
            client_auth=client_auth,
            grant=grant,
            allow_bearer=allow_bearer,
            timeout=timeout,
            renew_before=renew_before,
            default_lifetime=default_lifetime,
            nonce_store=nonce_store,
            proof_factory=proof_factory,
            session=session,
        )
        if allow_bearer:
            log.warning(
                "client %r: Bearer access tokens are accepted for this login (allow_bearer); "
                "only the refresh token is bound to the key",
                client_id,
            )
        if token is not None:
            if token.jkt != signer.thumbprint:
                raise ConfigurationError("the token is bound to another key than the signer")
            self.cache.put(self.cache_key, token)

    def __repr__(self) -> str:
        return (
            f"LoginSession(issuer={self.issuer!r}, client_id={self.client_id!r}, "
            f"profile={self.profile_name!r}, auth_method={self.auth_method!r}, "
            f"jkt={self.signer.thumbprint!r})"
        )

    @property
    def refresh_token(self) -> str | None:
        grant = self.grant
        return grant.refresh_token if isinstance(grant, RefreshTokenGrant) else None

    # --- renewal --------------------------------------------------------------------------

    def _acquire_locked(self) -> Token | Renewal | None:
        # Before renewing, look at the profile: another process may have refreshed already
        # (its access token is then good for us too: same key, same grant).
        token = self.cache.get(self.cache_key)
        if not self._renewing and (token is None or token.needs_renewal()):
            self._adopt_from_profile()
        return super()._acquire_locked()

    def invalidate(self, token: Token | None = None) -> None:
        """Forget the cached token (e.g. after the RS's ``invalid_token``), and never adopt it
        back from the profile, where it may still be stored."""
        current = token if token is not None else self.cache.get(self.cache_key)
        if current is not None:
            self._dead_tokens.append(current.access_token)
        super().invalidate(token)

    def _same_login(self, stored: Profile) -> bool:
        # A later `login --profile NAME` (same key, another issuer or client) may have replaced
        # the profile: its refresh token never goes to our token endpoint, and stays intact.
        return (
            stored.jkt == self.signer.thumbprint
            and stored.issuer == self.issuer
            and stored.client_id == self.client_id
            and stored.metadata.get("token_endpoint") == self.metadata.token_endpoint
        )

    def _adopt_from_profile(self) -> None:
        if self.profile_name is None or self.store is None:
            return
        try:
            stored = self.store.load(self.profile_name)
        except DPoPError:
            return  # the renewal itself reports what is wrong with the profile
        grant = self.grant
        if not self._same_login(stored) or not isinstance(grant, RefreshTokenGrant):
            return
        theirs = token_from_profile(
            stored, renew_before=self.renew_before, allow_bearer=self.allow_bearer
        )
        if theirs is None or theirs.needs_renewal() or theirs.access_token in self._dead_tokens:
            return
        if stored.refresh_token is not None and stored.refresh_token != grant.refresh_token:
            grant.replace(stored.refresh_token)
        self.cache.put(self.cache_key, theirs)

    def _refresh(self) -> Generator[HttpRequest, HttpResponse, TokenResponse]:
        try:
            response = yield from self.endpoint.token_flow(self.grant)
        except OAuthError as e:
            if e.error == "invalid_grant":  # RFC 6749 §5.2: expired, revoked, or not ours
                raise LoginRequiredError(
                    "the authorization server refused the refresh token (invalid_grant): "
                    "the login expired, was revoked, or belongs to another key"
                ) from e
            raise
        warn_if_bearer(self.client_id, response.token)
        return response

    def token_flow(self) -> Generator[HttpRequest, HttpResponse, Token]:
        """One refresh (RFC 6749 §6) with a proof; under the profile lock when there is one."""
        if self.profile_name is None or self.store is None:
            response = yield from self._refresh()
            return response.token
        with self.store.locked(self.profile_name, timeout=self._lock_timeout) as handle:
            stored = handle.load()
            if stored is None:
                raise LoginRequiredError(
                    f"profile {self.profile_name!r} no longer exists (logged out?)"
                )
            if stored.jkt != self.signer.thumbprint:
                raise ProfileError(f"profile {self.profile_name!r} now belongs to another key")
            if not self._same_login(stored):
                raise ProfileError(
                    f"profile {self.profile_name!r} now holds another login (issuer "
                    f"{stored.issuer[:200]!r}, client {stored.client_id[:100]!r}): load it again"
                )
            grant = self.grant
            if isinstance(grant, RefreshTokenGrant) and stored.refresh_token is None:
                raise LoginRequiredError(
                    f"profile {self.profile_name!r} has no usable refresh token any more"
                )
            if (
                isinstance(grant, RefreshTokenGrant)
                and stored.refresh_token is not None
                and stored.refresh_token != grant.refresh_token
            ):
                # Another process rotated meanwhile (while we waited for the lock, say): its
                # refresh token is the live one, and the access token it stored with it, still
                # fresh, saves this process a refresh of its own.
                grant.replace(stored.refresh_token)
                theirs = token_from_profile(
                    stored, renew_before=self.renew_before, allow_bearer=self.allow_bearer
                )
                if (
                    theirs is not None
                    and not theirs.needs_renewal()
                    and theirs.access_token not in self._dead_tokens
                ):
                    return theirs
            try:
                response = yield from self._refresh()
            except LoginRequiredError:
                handle.save(
                    dataclasses.replace(
                        stored,
                        refresh_token=None,
                        access_token=None,
                        token_type=None,
                        expires_at=None,
                        updated_at=time.time(),
                    )
                )
                raise
            token = response.token
            # RFC 9700 §4.14.2: the rotated refresh token is on disk before the token is used.
            try:
                handle.save(
                    dataclasses.replace(
                        stored,
                        refresh_token=self.refresh_token,
                        access_token=token.access_token,
                        token_type=token.token_type,
                        expires_at=_expiry_wall(token),
                        updated_at=time.time(),
                    )
                )
            except DPoPError as e:
                log.error(
                    "profile %r could not be updated (%s): this process keeps the new tokens, "
                    "later runs will have to log in again",
                    self.profile_name,
                    e.code,
                )
            return token

    # --- logout -----------------------------------------------------------------------------

    def logout_flow(self) -> Generator[HttpRequest, HttpResponse, LogoutResult]:
        """Revoke the refresh and access tokens (RFC 7009) where the AS allows it."""
        url = self.metadata.revocation_endpoint
        if url is None:
            return LogoutResult(revocation_endpoint=False)
        refresh_revoked = False
        refresh = self.refresh_token
        if refresh:
            refresh_revoked = yield from revocation_flow(
                url,
                client_id=self.client_id,
                client_auth=self.client_auth,
                token=refresh,
                hint="refresh_token",
            )
        access_revoked = False
        current = self.cache.get(self.cache_key)
        if current is not None and current.is_valid():
            access_revoked = yield from revocation_flow(
                url,
                client_id=self.client_id,
                client_auth=self.client_auth,
                token=current.access_token,
                hint="access_token",
            )
        self.invalidate()
        return LogoutResult(True, refresh_revoked, access_revoked)

    def logout(self, send: Sender | None = None) -> LogoutResult:
        """Revoke the tokens, then delete the profile (if any). Raises :class:`RevocationError`
        (the profile is then kept, so the logout can be retried).

        With a profile, all of it happens under the profile's lock, after re-reading it: the
        refresh token revoked is the live one even if another process rotated it since this
        session loaded it (revoking a dead one succeeds too, RFC 7009 §2.2, and would leave
        the grant alive), and a profile that now holds another login is left alone.
        """
        sender = send or self._default_sender()
        if self.profile_name is None or self.store is None:
            return run_flow(self.logout_flow(), sender)
        with self.store.locked(self.profile_name, timeout=self._lock_timeout) as handle:
            stored = handle.load()
            ours = stored is not None and self._same_login(stored)
            live = stored.refresh_token if ours and stored is not None else None
            if live is not None and isinstance(self.grant, RefreshTokenGrant):
                self.grant.replace(live)
            result: LogoutResult = run_flow(self.logout_flow(), sender)
            if ours:
                handle.delete()
        return result

    def close(self) -> None:
        """Close the signer when this session loaded it (hardware sessions, TPM contexts)."""
        if self._owns_signer:
            closer = getattr(self.signer, "close", None)
            if callable(closer):
                closer()

    def __enter__(self) -> LoginSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def client_auth_from_profile(
    profile: Profile,
    *,
    signer: Signer,
    client_secret: SecretSource | None = None,
    assertion_signer: Signer | None = None,
) -> ClientAuth:
    """The client authentication a profile names, with its secret from a source, never the file.

    ``client_secret`` wins over the profile's ``client_secret_source``; a method that needs a
    secret without either raises :class:`ConfigurationError`.
    """
    method = profile.auth_method
    if method == "none":
        return NoClientAuth()
    if method == "private_key_jwt":
        metadata = profile.server_metadata()
        return PrivateKeyJwt(assertion_signer or signer, audience=metadata.token_endpoint)
    source: SecretSource | None = client_secret or profile.client_secret_source
    if source is None:
        raise ConfigurationError(
            f"profile {profile.name!r} is a confidential client ({method}): give the client "
            "secret (DPOP_HSM_CLIENT_SECRET, a secret source, or a prompt)"
        )
    return SecretBasic(source) if method == "client_secret_basic" else SecretPost(source)


def load_profile(
    name: str,
    signer: Signer | None = None,
    *,
    store: ProfileStore | None = None,
    client_secret: SecretSource | None = None,
    key_secret: SecretSource | None = None,
    assertion_signer: Signer | None = None,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
    session: _requests.Session | None = None,
) -> LoginSession:
    """Resume the login stored in profile ``name`` as a :class:`LoginSession`.

    Without ``signer`` the profile's key reference is loaded (``key_secret`` is its PIN or
    password source; otherwise the reference's own ``pin-source`` or ``DPOP_HSM_PIN``).
    Raises :class:`ProfileNotFoundError`, :class:`ProfileCorruptError`,
    :class:`ProfilePermissionError`, :class:`ProfileError` when the key is not the profile's
    (a new key means a new login), and the signer's own errors.
    """
    from .signers import load_signer

    store = store if store is not None else ProfileStore()
    profile = store.load(name)
    owns = signer is None
    if signer is None:
        signer = load_signer(profile.key, secret=key_secret)
    if signer.thumbprint != profile.jkt:
        raise ProfileError(
            f"profile {name!r} is bound to the key with thumbprint {profile.jkt}, not "
            f"{signer.thumbprint}: log in again with this key"
        )
    metadata = profile.server_metadata()
    auth = client_auth_from_profile(
        profile, signer=signer, client_secret=client_secret, assertion_signer=assertion_signer
    )
    token = token_from_profile(profile, allow_bearer=profile.allow_bearer)
    return LoginSession(
        signer,
        metadata=metadata,
        client_id=profile.client_id,
        client_auth=auth,
        refresh_token=profile.refresh_token,
        token=token,
        scope=profile.scope,
        resource=profile.resource,
        allow_bearer=profile.allow_bearer,
        profile=name,
        store=store,
        timeout=timeout,
        session=session,
        owns_signer=owns,
    )


def logout(
    name: str,
    signer: Signer | None = None,
    *,
    store: ProfileStore | None = None,
    client_secret: SecretSource | None = None,
    key_secret: SecretSource | None = None,
    send: Sender | None = None,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
) -> LogoutResult:
    """Revoke profile ``name``'s tokens (RFC 7009) and delete it (:meth:`LoginSession.logout`)."""
    with load_profile(
        name,
        signer,
        store=store,
        client_secret=client_secret,
        key_secret=key_secret,
        timeout=timeout,
    ) as session:
        return session.logout(send)
