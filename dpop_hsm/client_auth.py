"""Client authentication at OAuth endpoints (RFC 6749 §2.3, RFC 7523 §2.2, RFC 8252 §8.5).

One :class:`ClientAuth` per method: ``client_secret_basic``, ``client_secret_post``,
``private_key_jwt`` (the assertion may be signed by the DPoP key itself, in hardware) and
``none`` for public clients. The token, PAR, device-authorization and revocation endpoints all
authenticate the same way, so :class:`~dpop_hsm.token_endpoint.TokenEndpoint` applies one of
these to every form it posts.
"""

from __future__ import annotations

import base64
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal
from urllib.parse import quote

from .errors import ConfigurationError
from .jose import b64url_encode, compact_json
from .secret_sources import SecretSource, resolve_secret
from .signers.base import Signer

__all__ = [
    "ASSERTION_TYPE",
    "AUTH_METHODS",
    "AuthMethod",
    "ClientAuth",
    "Form",
    "NoClientAuth",
    "PrivateKeyJwt",
    "SecretBasic",
    "SecretPost",
    "client_auth_for",
]

AuthMethod = Literal["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]
AUTH_METHODS: tuple[AuthMethod, ...] = (
    "client_secret_basic",
    "client_secret_post",
    "private_key_jwt",
    "none",
)
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"  # RFC 7523 §2.2


@dataclass
class Form:
    """One form POST being built: parameters, header fields, and the secrets it carries.

    ``secrets`` are the values a server might echo back into an error message; they are
    redacted from any server text that reaches an exception (never shown, never logged).
    """

    pairs: list[tuple[str, str]] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list, repr=False)


class ClientAuth(ABC):
    """How the client authenticates at the token, PAR, device and revocation endpoints.

    :meth:`prepare` runs once per renewal (a prompt for the secret appears once, even when a
    nonce challenge costs a second attempt) and returns what each attempt calls to stamp its
    form; ``private_key_jwt`` makes a new assertion per attempt, since a reused ``jti`` is
    rejected as a replay (RFC 7523 §3).
    """

    method: ClassVar[AuthMethod]

    @abstractmethod
    def prepare(self, client_id: str) -> Callable[[Form], None]:
        """Resolve secrets for one renewal; the result stamps each attempt's form."""


def _basic_credentials(client_id: str, secret: str) -> str:
    # RFC 6749 §2.3.1: both parts are form-urlencoded before Base64.
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


def _resolved(source: SecretSource) -> str:
    secret = resolve_secret(source, what="client_secret")
    if not secret:
        raise ConfigurationError("client_secret resolved to an empty value")
    return secret


class SecretBasic(ClientAuth):
    """``client_secret_basic`` (RFC 6749 §2.3.1): the secret in an ``Authorization`` header."""

    method = "client_secret_basic"

    def __init__(self, secret: SecretSource) -> None:
        self._secret = secret

    def prepare(self, client_id: str) -> Callable[[Form], None]:
        secret = _resolved(self._secret)
        credentials = _basic_credentials(client_id, secret)

        def stamp(form: Form) -> None:
            form.headers.append(("Authorization", credentials))
            form.secrets += [secret, credentials.removeprefix("Basic ")]

        return stamp

    def __repr__(self) -> str:
        return "SecretBasic(****)"


class SecretPost(ClientAuth):
    """``client_secret_post`` (RFC 6749 §2.3.1): ``client_id`` and the secret in the body."""

    method = "client_secret_post"

    def __init__(self, secret: SecretSource) -> None:
        self._secret = secret

    def prepare(self, client_id: str) -> Callable[[Form], None]:
        secret = _resolved(self._secret)

        def stamp(form: Form) -> None:
            form.pairs += [("client_id", client_id), ("client_secret", secret)]
            form.secrets.append(secret)

        return stamp

    def __repr__(self) -> str:
        return "SecretPost(****)"


class PrivateKeyJwt(ClientAuth):
    """``private_key_jwt`` (RFC 7523 §2.2, OIDC Core §9): a signed assertion per attempt.

    The signer may be the DPoP key itself (then the hardware signs both) or another key;
    ``kid`` defaults to the signer's RFC 7638 thumbprint.
    """

    method = "private_key_jwt"

    def __init__(
        self,
        signer: Signer,
        *,
        audience: str,
        kid: str | None = None,
        lifetime: float = 60.0,
        clock_offset: float = 0.0,
    ) -> None:
        if not 1 <= lifetime <= 3600:
            raise ConfigurationError("assertion_lifetime must be within 1..3600 seconds")
        self.signer = signer
        self.audience = audience
        self.kid = kid or signer.thumbprint
        self.lifetime = lifetime
        self.clock_offset = clock_offset
        self._header = b64url_encode(
            compact_json({"alg": signer.alg, "typ": "JWT", "kid": self.kid})
        )

    def assertion(self, client_id: str) -> str:
        """RFC 7523 §3: a new ``jti`` and ``iat`` every time."""
        now = int(time.time() + self.clock_offset)
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": self.audience,
            "jti": b64url_encode(os.urandom(16)),
            "iat": now,
            "exp": now + int(self.lifetime),
        }
        signing_input = self._header + "." + b64url_encode(compact_json(claims))
        signature = self.signer.sign(signing_input.encode("ascii"))
        return signing_input + "." + b64url_encode(signature)

    def prepare(self, client_id: str) -> Callable[[Form], None]:
        def stamp(form: Form) -> None:
            assertion = self.assertion(client_id)
            form.pairs += [
                ("client_id", client_id),
                ("client_assertion_type", ASSERTION_TYPE),
                ("client_assertion", assertion),
            ]
            form.secrets.append(assertion)

        return stamp

    def __repr__(self) -> str:
        return f"PrivateKeyJwt(kid={self.kid!r}, audience={self.audience!r})"


class NoClientAuth(ClientAuth):
    """``none`` (RFC 6749 §2.1 public clients, RFC 8252 §8.5 native apps): ``client_id`` only."""

    method = "none"

    def prepare(self, client_id: str) -> Callable[[Form], None]:
        def stamp(form: Form) -> None:
            form.pairs.append(("client_id", client_id))

        return stamp

    def __repr__(self) -> str:
        return "NoClientAuth()"


def client_auth_for(
    method: str | None,
    *,
    client_secret: SecretSource | None,
    assertion_signer: Signer,
    audience: str,
    assertion_kid: str | None = None,
    assertion_lifetime: float = 60.0,
    clock_offset: float = 0.0,
) -> ClientAuth:
    """The :class:`ClientAuth` for a method name, checking the secret fits the method.

    No method: ``client_secret_basic`` with a secret, else ``private_key_jwt``.
    """
    chosen = method or ("client_secret_basic" if client_secret is not None else "private_key_jwt")
    if chosen not in AUTH_METHODS:
        raise ConfigurationError(f"auth_method must be one of {', '.join(AUTH_METHODS)}")
    if chosen in ("client_secret_basic", "client_secret_post"):
        if client_secret is None:
            raise ConfigurationError(f"auth_method {chosen} needs client_secret")
        return (
            SecretBasic(client_secret)
            if chosen == "client_secret_basic"
            else SecretPost(client_secret)
        )
    if client_secret is not None:
        raise ConfigurationError(f"auth_method {chosen} takes no client_secret")
    if chosen == "none":
        return NoClientAuth()
    return PrivateKeyJwt(
        assertion_signer,
        audience=audience,
        kid=assertion_kid,
        lifetime=assertion_lifetime,
        clock_offset=clock_offset,
    )
