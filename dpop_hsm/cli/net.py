"""The network subcommands of ``dpop-hsm``: ``token``, ``request`` and ``serve``.

``--help`` and the key commands never import ``requests`` machinery: each function here imports
what it uses when it runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from .common import (
    CLIENT_SECRET_ENV,
    SECRET_METHODS,
    Output,
    UsageError,
    add_client_options,
    add_key_options,
    close_signer,
    load_key,
    secret_from_options,
)
from .settings import CLIENT_SETTINGS, PROFILE_SETTINGS, missing

if TYPE_CHECKING:
    from ..signers.base import Signer
    from ..testing import ClientRegistration
    from ..token import TokenClient

__all__ = [
    "DEMO_CLIENT_SECRET",
    "AddressInUseError",
    "ListenError",
    "cmd_request",
    "cmd_serve",
    "cmd_token",
    "demo_clients",
    "make_token_client",
    "register",
]

_MAX_PRINTED_BODY = 1 << 20
# The public demo client secret of the local test servers, registered only there.
DEMO_CLIENT_SECRET = "secret"  # noqa: S105


def make_token_client(args: argparse.Namespace, signer: Signer) -> TokenClient:
    """A TokenClient from the shared client options; the client secret never comes from argv."""
    from ..signers import load_signer
    from ..token import TokenClient

    if not args.token_endpoint:
        raise UsageError(missing("token_endpoint", "token endpoint"))
    if not args.client_id:
        raise UsageError(missing("client_id", "client id"))
    secret = None
    if args.auth_method in SECRET_METHODS:
        secret = secret_from_options(
            args.client_secret_source, env=CLIENT_SECRET_ENV, what="client secret"
        )
        if secret is None:
            raise ConfigurationError(
                f"{args.auth_method} needs a client secret: --client-secret-source env:NAME|"
                f"file:PATH, or ${CLIENT_SECRET_ENV}"
            )
    assertion_signer = None
    if args.assertion_key:
        assertion_signer = load_signer(args.assertion_key, allow_module_path=True)
    return TokenClient(
        signer,
        token_endpoint=args.token_endpoint,
        client_id=args.client_id,
        client_secret=secret,
        auth_method=args.auth_method,
        assertion_signer=assertion_signer,
        scope=args.scope,
        resource=args.resource,
        timeout=args.timeout,
    )


def _profile_token(args: argparse.Namespace, out: Output) -> int:
    from .login import profile_client

    client = profile_client(args)
    try:
        token = client.get_token()
    finally:
        client.close()
    data: dict[str, Any] = {
        "profile": args.profile,
        "token_type": token.token_type,
        "expires_in": round(token.expires_in()),
        "scope": token.scope,
        "jkt": client.signer.thumbprint,
    }
    if not token.is_dpop:  # visible on purpose: only the refresh token is bound to the key
        data["note"] = "Bearer access token, accepted because allow_bearer is set for the profile"
    if args.show_token:
        data["access_token"] = token.access_token
    out.emit(data, "\n".join(f"{k + ':':14}{v}" for k, v in data.items()))
    return 0


def cmd_token(args: argparse.Namespace, out: Output) -> int:
    if getattr(args, "profile", None):
        return _profile_token(args, out)
    signer = load_key(args)
    try:
        token = make_token_client(args, signer).get_token()
    finally:
        close_signer(signer)
    data: dict[str, Any] = {
        "token_type": token.token_type,
        "expires_in": round(token.expires_in()),
        "scope": token.scope,
        "jkt": signer.thumbprint,
    }
    if args.show_token:
        data["access_token"] = token.access_token
    text = "\n".join(f"{k + ':':14}{v}" for k, v in data.items())
    out.emit(data, text)
    return 0


def _parse_header(raw: str) -> tuple[str, str]:
    name, sep, value = raw.partition(":")
    if not sep or not name.strip() or any(c in name for c in " \t\r\n"):
        # Not echoed: a malformed header is often a credential (-H 'X-Api-Key abc…').
        raise ConfigurationError(
            f"a -H header ({len(raw)} characters) must look like 'Name: value'"
        )
    if "\r" in value or "\n" in value:
        raise ConfigurationError(f"header {name!r} contains a line break")
    lower = name.strip().lower()
    if lower in ("authorization", "dpop"):
        raise ConfigurationError(f"{name.strip()} is set by dpop-hsm; do not pass it with -H")
    return name.strip(), value.strip()


def _request_body(data: str | None) -> bytes | None:
    if data is None:
        return None
    if data.startswith("@"):
        try:
            with open(data[1:], "rb") as f:
                return f.read()
        except OSError as e:
            raise ConfigurationError(f"cannot read {data[1:]!r}: {e.strerror}") from e
    return data.encode("utf-8")


def cmd_request(args: argparse.Namespace, out: Output) -> int:
    from ..requests import DPoPSession

    headers = dict(_parse_header(h) for h in args.header or [])
    body = _request_body(args.data)
    method = (args.method or ("POST" if body is not None else "GET")).upper()
    if getattr(args, "profile", None):
        from .login import profile_client

        profile = profile_client(args)  # a LoginSession: refreshed with a proof when due
        try:
            with DPoPSession(profile) as session:
                response = _send(session, method, args.url, headers, body, args.timeout)
        finally:
            profile.close()
    else:
        signer = load_key(args)
        try:
            client = make_token_client(args, signer)
            with DPoPSession(client) as session:
                response = _send(session, method, args.url, headers, body, args.timeout)
        finally:
            close_signer(signer)
    content = response.content[:_MAX_PRINTED_BODY]
    data: dict[str, Any] = {
        "status": response.status_code,
        "headers": dict(response.headers),
        "body": content.decode("utf-8", "replace"),
    }
    lines = []
    if args.include:
        lines.append(f"HTTP/1.1 {response.status_code} {response.reason}")
        lines += [f"{k}: {v}" for k, v in response.headers.items()]
        lines.append("")
    lines.append(data["body"])
    out.emit(data, "\n".join(lines))
    return 0 if response.status_code < 400 else 5


def _send(
    session: Any, method: str, url: str, headers: dict[str, str], body: bytes | None, timeout: float
) -> Any:
    import requests

    from ..errors import TransportError
    from ..logs import loggable_url

    try:
        return session.request(method, url, headers=headers, data=body, timeout=timeout)
    except requests.RequestException as e:
        raise TransportError(
            f"{method} {loggable_url(url)[:200]} failed: {type(e).__name__}"
        ) from e


def demo_clients(jwt_client_key: str | None) -> list[ClientRegistration]:
    """The clients the local servers register for ``serve`` and ``demo`` (test secrets only)."""
    from ..testing import DEFAULT_CLIENT, DEFAULT_PUBLIC_CLIENT, ClientRegistration

    clients = [
        ClientRegistration("m2m.dpop", "client_secret_post", DEMO_CLIENT_SECRET),
        ClientRegistration("m2m.dpop.basic", "client_secret_basic", DEMO_CLIENT_SECRET),
        DEFAULT_CLIENT,  # what LocalDPoPServers() serves: the pytest plugin's client
        DEFAULT_PUBLIC_CLIENT,  # a public native client for `dpop-hsm login` (RFC 8252)
    ]
    if jwt_client_key:
        from ..signers import load_signer

        key = load_signer(jwt_client_key, allow_module_path=True)
        clients.append(ClientRegistration("m2m.dpop.jwt", "private_key_jwt", jwk=key.public_jwk))
        close_signer(key)
    return clients


class ListenError(ConfigurationError):
    """``serve`` cannot listen on the port it was given (privileged, bad address, …)."""

    code = "cannot_listen"

    def __init__(self, message: str, *, hint: str) -> None:
        super().__init__(message)
        self.hint = hint

    def diagnostics(self) -> str:
        return f"{self.message} ({self.hint})"


class AddressInUseError(ListenError):
    """Another process already listens on the port ``serve`` was given."""

    code = "address_in_use"


def _busy(host: str, port: int) -> bool:
    """True when ``port`` cannot be bound now (the same SO_REUSEADDR the servers use)."""
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def _listen_error(e: OSError, host: str, ports: dict[str, int]) -> ListenError:
    import errno

    if e.errno == errno.EADDRINUSE:
        given = {role: port for role, port in ports.items() if port}
        busy = [f"{host}:{port} ({role})" for role, port in given.items() if _busy(host, port)]
        where = ", ".join(busy or [f"{host}:{port} ({role})" for role, port in given.items()])
        return AddressInUseError(
            f"cannot listen on {where or host}: address already in use",
            hint="stop what listens there, or pick another --as-port/--rs-port; 0 picks a free one",
        )
    return ListenError(
        f"cannot listen on {host}: {e.strerror or type(e).__name__}",
        hint="ports below 1024 need privileges; 0 picks any free port",
    )


def cmd_serve(args: argparse.Namespace, out: Output) -> int:
    from ..testing import LocalDPoPServers

    ports = {"AS": args.as_port, "RS": args.rs_port}
    for role, port in ports.items():
        if not 0 <= port <= 65535:
            raise UsageError(f"--{role.lower()}-port {port} is not a TCP port (0-65535)")
    if args.as_port and args.as_port == args.rs_port:
        raise UsageError("--as-port and --rs-port must differ: AS and RS are two servers")
    servers = LocalDPoPServers(
        clients=demo_clients(args.jwt_client_key),
        as_nonce=not args.no_nonce,
        rs_nonce=not args.no_nonce,
        token_lifetime=args.token_lifetime,
        as_port=args.as_port,
        rs_port=args.rs_port,
    )
    try:
        servers.start()
    except OSError as e:
        servers.stop()  # the server that did bind, if one did
        raise _listen_error(e, "127.0.0.1", ports) from e
    paste = (
        f"DPOP_HSM_CLIENT_SECRET=secret dpop-hsm request --key KEY --token-endpoint "
        f"{servers.token_endpoint} --client-id m2m.dpop --auth-method client_secret_post "
        f"--scope api {servers.api_url}"
    )
    out.emit(
        {
            "token_endpoint": servers.token_endpoint,
            "api": servers.api_url,
            "jwks": servers.jwks_url,
            "clients": sorted(servers.clients),
            "client_secret": "secret (test servers only)",
        },
        f"{servers.endpoints()}\n\n(test client secret: 'secret')\ntry:\n  {paste}\n"
        "Ctrl-C stops the servers.",
    )
    servers.serve_forever()
    return 0


def _add_profile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile",
        metavar="NAME",
        help="use the login stored by 'dpop-hsm login --profile NAME' instead of the client "
        "options (refreshed with a proof when due)",
    )


def register(sub: Any) -> None:
    """Add the network subcommands to the main parser's subparsers."""
    p = sub.add_parser("token", help="fetch a DPoP-bound access token (client_credentials)")
    add_key_options(p)
    add_client_options(p)
    p.add_argument("--show-token", action="store_true", help="print the access token itself")
    _add_profile_option(p)
    p.set_defaults(func=cmd_token, settings=CLIENT_SETTINGS, profile_settings=PROFILE_SETTINGS)

    p = sub.add_parser("request", help="a curl-like request with DPoP")
    add_key_options(p)
    add_client_options(p)
    p.add_argument("-X", "--method")
    p.add_argument("-H", "--header", action="append", metavar="'Name: value'")
    p.add_argument("-d", "--data", help="request body, or @FILE")
    p.add_argument("-i", "--include", action="store_true", help="print the response headers")
    p.add_argument("url")
    _add_profile_option(p)
    p.set_defaults(func=cmd_request, settings=CLIENT_SETTINGS, profile_settings=PROFILE_SETTINGS)

    p = sub.add_parser("serve", help="run the local authorization + resource server")
    p.add_argument("--as-port", type=int, default=0, metavar="P", help="default 0: any free port")
    p.add_argument("--rs-port", type=int, default=0, metavar="P", help="default 0: any free port")
    p.add_argument("--token-lifetime", type=float, default=300.0)
    p.add_argument("--no-nonce", action="store_true", help="do not require DPoP nonces")
    p.add_argument(
        "--jwt-client-key", metavar="REF", help="register client m2m.dpop.jwt with this key"
    )
    p.set_defaults(func=cmd_serve)
