"""``dpop-hsm login`` / ``logout`` and ``--profile`` for ``token`` and ``request``.

:func:`register` adds the two subcommands; :func:`run_login` and :func:`run_logout` run
them; :func:`profile_client` gives ``token`` and ``request`` their ``--profile NAME``.
Everything the CLI prints on success is one line (or one JSON document with ``--json``)
naming the profile, scope, expiry and jkt — never a token.

Secrets follow the CLI's rules: never from argv. A client secret comes from
``--client-secret-source env:NAME|file:PATH``, ``DPOP_HSM_CLIENT_SECRET`` or a prompt; the
profile remembers at most the source's name. The client is public (``none``, RFC 8252 §8.5)
unless ``--client-secret-source`` or ``--auth-method`` says otherwise.

Hardware keys: the PIN prompt names the token, and a signature that has not returned after a
second prints that the device is waiting (a YubiKey with a touch policy blinks until touched).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TextIO

from ..errors import ConfigurationError
from .common import (
    CLIENT_SECRET_ENV,
    KEY_ENV,
    PIN_ENV,
    SECRET_METHODS,
    Output,
    PromptOnce,
    UsageError,
    add_key_options,
    close_signer,
    secret_from_options,
)
from .settings import KEY_SETTINGS

if TYPE_CHECKING:
    from ..login_session import LoginSession
    from ..signers.base import Signer

__all__ = [
    "TouchNotice",
    "profile_client",
    "register",
    "run_login",
    "run_logout",
]

AUTH_METHODS = ("none", "client_secret_basic", "client_secret_post", "private_key_jwt")
TOUCH_NOTICE_AFTER = 1.0


class TouchNotice:
    """A Signer wrapper that says so when the device makes a signature wait.

    A YubiKey with touch policy ``always``/``cached`` blocks the signature until it is touched;
    without a word the command just seems to hang. Everything else is the wrapped signer's.
    """

    def __init__(self, signer: Signer, *, stream: TextIO | None = None, after: float = 1.0):
        self._signer = signer
        self._stream = stream
        self._after = after

    @property
    def alg(self) -> str:
        return self._signer.alg

    @property
    def public_jwk(self) -> Mapping[str, str]:
        return self._signer.public_jwk

    @property
    def thumbprint(self) -> str:
        return self._signer.thumbprint

    def _notice(self) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write("dpop-hsm: waiting for the key to sign (touch it if it is blinking)\n")
        stream.flush()

    def sign(self, signing_input: bytes) -> bytes:
        timer = threading.Timer(self._after, self._notice)
        timer.daemon = True
        timer.start()
        try:
            return self._signer.sign(signing_input)
        finally:
            timer.cancel()

    def close(self) -> None:
        closer = getattr(self._signer, "close", None)
        if callable(closer):
            closer()

    def __repr__(self) -> str:
        return f"TouchNotice({self._signer!r})"


def _pin_prompt(ref: str) -> PromptOnce:
    """A prompt that names the token (``PIN for token YubiKey PIV #123``), asked once."""
    what = "PIN"
    if ref.startswith("pkcs11:"):
        from ..signers.pkcs11_uri import Pkcs11Uri

        with contextlib.suppress(ConfigurationError):
            what = f"PIN for {Pkcs11Uri.parse(ref).describe_token()}"
    elif ref.startswith("tpm2:"):
        what = "TPM key auth value"
    return PromptOnce(what)


def _key_secret(ref: str, pin_source: str | None) -> Any:
    if pin_source:
        return secret_from_options(pin_source, env=None, what="PIN or key password")
    if PIN_ENV in os.environ or "pin-source=" in ref or "auth-source=" in ref:
        return None  # the backend resolves it
    if ref.startswith(("pkcs11:", "tpm2:")) and sys.stdin is not None and sys.stdin.isatty():
        return _pin_prompt(ref)
    return None


def _load_signer(ref: str, pin_source: str | None) -> Signer:
    from ..signers import load_signer

    signer = load_signer(ref, secret=_key_secret(ref, pin_source))
    if ref.startswith(("pkcs11:", "tpm2:")):
        return TouchNotice(signer, after=TOUCH_NOTICE_AFTER)
    return signer


def _client_secret(args: argparse.Namespace, method: str) -> Any:
    if method not in SECRET_METHODS:
        if args.client_secret_source:
            raise ConfigurationError(f"auth method {method} takes no client secret")
        return None
    secret = secret_from_options(
        args.client_secret_source, env=CLIENT_SECRET_ENV, what="client secret"
    )
    if secret is None:
        raise ConfigurationError(
            f"{method} needs a client secret: --client-secret-source env:NAME|file:PATH, "
            f"or ${CLIENT_SECRET_ENV}"
        )
    return secret


def _summary(session: LoginSession, profile: str | None) -> tuple[dict[str, Any], str]:
    token = session.cached_token() or session.cache.get(session.cache_key)
    expires_in = round(token.expires_in()) if token is not None else None
    scope = token.scope if token is not None and token.scope else session.scope
    data: dict[str, Any] = {
        "profile": profile,
        "issuer": session.issuer,
        "client_id": session.client_id,
        "scope": scope,
        "token_type": token.token_type if token is not None else None,
        "expires_in": expires_in,
        "jkt": session.signer.thumbprint,
        "refresh_token": session.refresh_token is not None,
    }
    bearer = token is not None and not token.is_dpop
    text = (
        f"profile {profile}: logged in to {session.issuer} as {session.client_id}"
        f" (scope {scope or '-'}), token expires in {expires_in} s, jkt {session.signer.thumbprint}"
        + (" [Bearer access token: allow_bearer]" if bearer else "")
        + ("" if session.refresh_token is not None else " [no refresh token]")
    )
    return data, text


def run_login(args: argparse.Namespace, out: Output) -> int:
    """``dpop-hsm login``: an interactive login stored as a profile."""
    from ..login import TerminalPrompt, login
    from ..profiles import validate_key_reference, validate_profile_name

    profile = validate_profile_name(args.profile)
    ref = args.key or os.environ.get(KEY_ENV)
    if not ref:
        raise UsageError(f"no key: give --key REF or set {KEY_ENV}")
    validate_key_reference(ref)  # before the PIN is asked for
    if args.device and args.no_browser:
        raise UsageError("--device opens no browser anyway; drop --no-browser")
    if args.login_timeout <= 0 or args.timeout <= 0:
        raise UsageError("--login-timeout and --timeout must be positive")
    method = args.auth_method or ("client_secret_basic" if args.client_secret_source else "none")
    secret = _client_secret(args, method)
    signer = _load_signer(ref, args.pin_source)
    assertion = None
    if args.assertion_key:
        if method != "private_key_jwt":
            raise UsageError("--assertion-key is for --auth-method private_key_jwt")
        assertion = _load_signer(args.assertion_key, None)
    source = args.client_secret_source if secret is not None else None
    session = login(
        signer,
        issuer=args.issuer,
        client_id=args.client_id,
        scope=args.scope,
        resource=args.resource,
        auth_method=method,
        client_secret=secret,
        assertion_signer=assertion,
        device=args.device,
        par=False if args.no_par else None,
        redirect_port=args.redirect_port,
        login_timeout=args.login_timeout,
        prompt=TerminalPrompt(open_browser=not args.no_browser and not args.device),
        profile=profile,
        key_reference=ref,
        client_secret_source=source,
        allow_bearer=args.allow_bearer,
        timeout=args.timeout,
    )
    data, text = _summary(session, profile)
    session.close()
    out.emit(data, text)
    return 0


def _forget(args: argparse.Namespace, out: Output) -> int:
    """``logout --local``: delete the profile; no key, no network, nothing revoked."""
    from ..errors import ProfileNotFoundError
    from ..profiles import ProfileStore, validate_profile_name

    name = validate_profile_name(args.profile)
    if not ProfileStore().delete(name):
        raise ProfileNotFoundError(f"no profile {name!r}")
    data = {
        "profile": name,
        "revoked_refresh_token": False,
        "revoked_access_token": False,
        "revocation_endpoint": None,
    }
    out.emit(
        data,
        f"profile {name}: deleted without revoking (its refresh token stays valid at the "
        "authorization server until it expires; it is bound to the key)",
    )
    return 0


def run_logout(args: argparse.Namespace, out: Output) -> int:
    """``dpop-hsm logout``: revoke (RFC 7009) and delete the profile.

    When revocation fails the profile is kept, refresh token and all: deleting it would leave
    the grant alive at the AS with nothing left here to revoke it with, and a later
    ``logout`` can try again. ``--local`` deletes it anyway (a lost key, an AS gone for good).
    """
    from ..errors import ProtocolError

    if args.local:
        return _forget(args, out)
    session = profile_client(args)
    try:
        result = session.logout()
    except ProtocolError:
        sys.stderr.write(
            f"dpop-hsm: profile {args.profile} is kept, its refresh token not revoked: run "
            f"logout again later, or 'dpop-hsm logout --local --profile {args.profile}' to "
            "delete it without revoking\n"
        )
        raise
    finally:
        session.close()
    if not result.revocation_endpoint:
        note = "the authorization server has no revocation endpoint; nothing was revoked"
    elif result.refresh_token_revoked:
        note = "refresh token revoked"
    else:
        note = "nothing to revoke"
    data = {
        "profile": args.profile,
        "revoked_refresh_token": result.refresh_token_revoked,
        "revoked_access_token": result.access_token_revoked,
        "revocation_endpoint": result.revocation_endpoint,
    }
    out.emit(data, f"profile {args.profile}: logged out ({note}), profile deleted")
    return 0


def profile_client(args: argparse.Namespace) -> LoginSession:
    """The :class:`LoginSession` of ``--profile``: its key, secret source and timeout.

    The key comes from the profile (``--key`` may name the same key another way, and must
    have the profile's thumbprint); the client secret, for a confidential client, from
    ``--client-secret-source``, the profile's stored source name, ``DPOP_HSM_CLIENT_SECRET``
    or a prompt.
    """
    from ..login_session import load_profile
    from ..profiles import ProfileStore

    store = ProfileStore()
    stored = store.load(args.profile)
    ref = getattr(args, "key", None) or stored.key
    signer = _load_signer(ref, getattr(args, "pin_source", None))
    secret = None
    if stored.auth_method in ("client_secret_basic", "client_secret_post"):
        source = getattr(args, "client_secret_source", None) or stored.client_secret_source
        secret = secret_from_options(source, env=CLIENT_SECRET_ENV, what="client secret")
    try:
        return load_profile(
            args.profile,
            signer,
            store=store,
            client_secret=secret,
            timeout=getattr(args, "timeout", 10.0),
        )
    except BaseException:
        close_signer(signer)
        raise


def register(sub: Any) -> None:
    """Register ``login`` and ``logout`` on the main parser's subcommands."""
    p = sub.add_parser(
        "login",
        help="log in interactively (browser or device code) and store a profile",
        description="Authorization code + PKCE (+ PAR) with DPoP, or the device grant; the "
        "tokens are bound to --key and stored in --profile.",
    )
    add_key_options(p)
    p.add_argument("--issuer", metavar="URL", required=True, help="the authorization server")
    p.add_argument("--client-id", required=True)
    p.add_argument("--scope", help="space-separated scopes (offline_access added when listed)")
    p.add_argument("--resource", action="append", help="RFC 8707 resource (repeatable)")
    p.add_argument("--profile", metavar="NAME", default="default", help="default: default")
    p.add_argument(
        "--auth-method",
        choices=AUTH_METHODS,
        help="default: none (a public native client), client_secret_basic when "
        "--client-secret-source is given",
    )
    p.add_argument(
        "--client-secret-source",
        metavar="SRC",
        help="client secret from env:NAME or file:PATH (with a secret auth method also "
        "$DPOP_HSM_CLIENT_SECRET or a prompt)",
    )
    p.add_argument(
        "--assertion-key",
        metavar="REF",
        help="private_key_jwt: key that signs the client assertion (default: the DPoP key)",
    )
    p.add_argument("--device", action="store_true", help="device authorization grant (RFC 8628)")
    p.add_argument(
        "--no-browser", action="store_true", help="print the URL on stderr, open no browser"
    )
    p.add_argument("--no-par", action="store_true", help="no pushed authorization request")
    p.add_argument("--redirect-port", type=int, default=0, metavar="N", help="default: random")
    p.add_argument(
        "--login-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds to wait for the user (default 300)",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request")
    p.add_argument(
        "--allow-bearer",
        action="store_true",
        help="accept Bearer access tokens for this client (only the refresh token is bound)",
    )
    p.set_defaults(func=run_login, settings=KEY_SETTINGS)

    p = sub.add_parser("logout", help="revoke a profile's tokens (RFC 7009) and delete it")
    p.add_argument("--profile", metavar="NAME", default="default", help="default: default")
    p.add_argument("--pin-source", metavar="SRC", help="PIN source for the profile's key")
    p.add_argument("--client-secret-source", metavar="SRC")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request")
    p.add_argument(
        "--local",
        action="store_true",
        help="only delete the profile: no key, no network, nothing revoked (a lost key)",
    )
    p.set_defaults(func=run_logout)
