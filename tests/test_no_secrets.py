"""No secret anywhere: repr, str, exception messages and DEBUG logs of every public class.

Secrets: the client secret (and its Basic-auth encoding), PINs and key auth values, access
tokens, proofs and client assertions, private key material (the JWK ``d``, PEM, DER). Each is a
distinctive random marker, so a leak anywhere — even half-encoded — is found by substring
search. Also: plain HTTP is refused for every endpoint but loopback.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import json
import logging
import secrets
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

import dpop_hsm
from dpop_hsm import errors
from dpop_hsm.errors import DPoPError, InsecureEndpointError
from dpop_hsm.jose import b64url_encode
from dpop_hsm.proof import ProofFactory
from dpop_hsm.resource_flow import ResourceFlow
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.verify import verify_proof
from tests.support.raw_http import RawServer, Seen, response

token_mod = pytest.importorskip("dpop_hsm.token", reason="token client not landed")
requests_mod = pytest.importorskip("dpop_hsm.requests", reason="requests adapter not landed")
TokenClient = token_mod.TokenClient

CLIENT_SECRET = "cs-" + secrets.token_hex(12)
ACCESS_TOKEN = "at-" + secrets.token_hex(12)
PASSWORD = "pw-" + secrets.token_hex(12)
TOKEN_JSON = json.dumps(
    {"access_token": ACCESS_TOKEN, "token_type": "DPoP", "expires_in": 300, "refresh_token": "rt"}
).encode()


def basic_forms(secret: str) -> list[str]:
    """The secret plus the encodings it may travel in (Basic auth, form, base64url)."""
    pair = f"client-1:{secret}".encode()
    return [secret, base64.b64encode(pair).decode(), b64url_encode(secret.encode())]


def assert_absent(text: str, needles: Iterable[str], where: str) -> None:
    for needle in needles:
        if needle and len(needle) >= 8:
            assert needle not in text, f"a secret ({needle[:4]}...) leaked into {where}"


def private_material(signer: SoftwareSigner) -> list[str]:
    """``d`` of the JWK, the PEM body lines and the raw scalar: what must never be shown."""
    pem = signer.private_pem().decode()
    lines = [ln for ln in pem.splitlines() if ln and not ln.startswith("-----")]
    key: Any = signer._key  # the test inspects the key it must not find anywhere
    numbers = key.private_numbers()
    size = (key.curve.key_size + 7) // 8
    d = b64url_encode(numbers.private_value.to_bytes(size, "big"))
    return [d, str(numbers.private_value), *lines]


@pytest.fixture(scope="module")
def signer() -> SoftwareSigner:
    return SoftwareSigner.generate("ES256")


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)  # the root logger: every dpop_hsm.* logger and libraries
    yield caplog


@pytest.fixture
def server() -> Iterator[RawServer]:
    """AS + RS in one: /token answers a token, everything else 200, then a 401 challenge."""

    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        if seen.path.endswith("/token"):
            conn.sendall(response(200, TOKEN_JSON, [("DPoP-Nonce", "n-" + str(index))]))
        elif seen.path.endswith("/denied"):
            challenge = 'DPoP error="invalid_token", error_description="expired"'
            conn.sendall(response(401, b"", [("WWW-Authenticate", challenge)]))
        else:
            conn.sendall(response(200, b'{"ok":true}'))

    srv = RawServer(handler)
    yield srv
    srv.close()


def sent_credentials(server: RawServer) -> list[str]:
    """Every credential the server received: proofs, Authorization values, form secrets."""
    found = []
    for seen in server.seen:
        for name in ("DPoP", "Authorization"):
            value = seen.header(name)
            if value:
                found += [value, value.split(" ", 1)[-1]]
        body = seen.body.decode("latin-1")
        for pair in body.split("&"):
            name, _, value = pair.partition("=")
            if name in ("client_secret", "client_assertion"):
                found.append(value)
    return found


# --- repr / str of every public class ------------------------------------------------------


def test_software_signer_repr_and_public_members_hold_no_private_key(
    signer: SoftwareSigner,
) -> None:
    shown = repr(signer) + str(signer) + json.dumps(dict(signer.public_jwk))
    shown += repr(ProofFactory(signer)) + signer.thumbprint
    assert_absent(shown, private_material(signer), "SoftwareSigner repr/str/public_jwk")
    assert "d" not in signer.public_jwk


def test_key_loading_errors_show_neither_password_nor_key(
    signer: SoftwareSigner, tmp_path: Path
) -> None:
    material = private_material(signer)
    encrypted = signer.private_pem(password=PASSWORD)
    messages = []
    attempt: Callable[[], object]
    for attempt in (
        lambda: SoftwareSigner.from_bytes(encrypted, password="wrong-" + PASSWORD),
        lambda: SoftwareSigner.from_bytes(encrypted),
        lambda: SoftwareSigner.from_bytes(signer.private_pem(), password=PASSWORD),
        lambda: SoftwareSigner.from_bytes(encrypted[:-40], password=PASSWORD),
        lambda: SoftwareSigner.from_bytes(signer.private_pem()[:-60]),
        lambda: SoftwareSigner.from_jwk({"kty": "EC", "crv": "P-256", "d": material[0]}),
        lambda: SoftwareSigner.from_jwk({"kty": "EC", "crv": "P-9", "d": material[0], "x": 1}),
        lambda: SoftwareSigner.from_bytes(json.dumps({"kty": "RSA", "d": material[0]}).encode()),
    ):
        with pytest.raises(DPoPError) as info:
            attempt()
        messages += [str(info.value), repr(info.value), info.value.diagnostics()]
    assert_absent("\n".join(messages), [PASSWORD, *material], "key loading errors")


def test_secret_callback_failures_do_not_echo_the_exception_text() -> None:
    from dpop_hsm.secret_sources import resolve_secret

    def callback() -> str:
        raise RuntimeError(f"vault said: {PASSWORD}")

    with pytest.raises(errors.SecretSourceError) as info:
        resolve_secret(callback, what="client_secret")
    assert_absent(str(info.value) + repr(info.value), [PASSWORD], "SecretSourceError")


def test_token_client_token_and_adapters_repr(signer: SoftwareSigner) -> None:
    client = TokenClient(
        signer,
        token_endpoint="https://as.example.com/token",
        client_id="client-1",
        client_secret=CLIENT_SECRET,
    )
    token = client.parse_response(
        token_mod.HttpResponse(200, (), TOKEN_JSON), sent_monotonic=0.0, sent_wall=0.0
    )
    request = client.token_request(nonce="n-1")
    stamp = ResourceFlow(client, raise_on_rejection=False).stamp(
        "GET", f"https://rs.example.com/api?access_token={CLIENT_SECRET}", token
    )
    shown = [
        repr(stamp),
        str(stamp),
        repr(client),
        str(client),
        repr(token),
        str(token),
        repr(token.extra),
        repr(request),
        str(request),
        repr(client.nonces),
        repr(client.cache_key),
        repr(requests_mod.DPoPAuth(client)),
        repr(requests_mod.DPoPSession(client).dpop_auth),
    ]
    with contextlib.suppress(ImportError):
        from dpop_hsm.httpx import DPoPAuth as HttpxAuth

        shown.append(repr(HttpxAuth(client)))
    proof = request.header("DPoP") or ""
    secrets_ = [
        *basic_forms(CLIENT_SECRET),
        ACCESS_TOKEN,
        proof,
        stamp.proof,
        *private_material(signer),
    ]
    assert_absent("\n".join(shown), secrets_, "repr/str of the client classes")


def test_no_error_constructor_takes_a_secret() -> None:
    """errors.py's promise: no constructor takes a token, PIN, secret or proof."""
    forbidden = ("token", "pin", "secret", "proof", "password", "assertion", "key")
    for name in errors.__all__:
        cls = getattr(errors, name)
        params = inspect.signature(cls.__init__).parameters
        for param in params:
            assert not any(word in param.lower() for word in forbidden), (name, param)


@pytest.mark.parametrize("name", errors.__all__)
def test_every_error_class_renders_bounded_printable_text(name: str) -> None:
    """Server-controlled fields (OAuth ``error``/``error_description``) are shown sanitized."""
    cls = getattr(errors, name)
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    hostile = "\x1b[2J\x00" + "z" * 5000
    values: dict[str, Any] = {
        "message": "plain message",
        "check": "syntax",
        "status": 400,
        "module": "pkcs11",
        "extra": "pkcs11",
        "detail": hostile,
        "error": hostile,
        "error_description": hostile,
        "retry_after": 1.5,
    }
    error = cls(**{p: values[p] for p in params})
    assert isinstance(error, DPoPError) and error.code
    rendered = repr(error) + str(error) + error.diagnostics()
    assert "\x1b" not in rendered and "\x00" not in rendered
    assert len(rendered) < 4000


def test_verifier_errors_never_echo_the_proof_or_token(signer: SoftwareSigner) -> None:
    factory = ProofFactory(signer)
    proof = factory.create("GET", "https://rs.example.com/x", access_token=ACCESS_TOKEN)
    messages = []
    for kwargs in (
        {"htm": "POST", "htu": "https://rs.example.com/x"},
        {"htm": "GET", "htu": "https://rs.example.com/y"},
        {"htm": "GET", "htu": "https://rs.example.com/x", "access_token": "other-" + ACCESS_TOKEN},
        {"htm": "GET", "htu": "https://rs.example.com/x", "nonce": "nonce-" + ACCESS_TOKEN},
        {"htm": "GET", "htu": "https://rs.example.com/x", "expected_jkt": "x" * 43},
        {"htm": "GET", "htu": "https://rs.example.com/x", "now": 0.0},
    ):
        with pytest.raises(errors.VerificationError) as info:
            verify_proof(proof, **kwargs)  # type: ignore[arg-type]
        messages += [str(info.value), repr(info.value)]
    with pytest.raises(errors.VerificationError) as info:
        verify_proof(proof[:-3] + "AAA", htm="GET", htu="https://rs.example.com/x")
    messages.append(str(info.value))
    parts = proof.split(".")
    assert_absent("\n".join(messages), [ACCESS_TOKEN, proof, *parts], "verification errors")


# --- DEBUG logs of whole flows -------------------------------------------------------------


@pytest.mark.parametrize(
    "auth_method", ["client_secret_basic", "client_secret_post", "private_key_jwt"]
)
def test_requests_flow_debug_logs_hold_no_secret(
    signer: SoftwareSigner,
    server: RawServer,
    debug_logs: pytest.LogCaptureFixture,
    auth_method: str,
) -> None:
    secret = None if auth_method == "private_key_jwt" else CLIENT_SECRET
    client = TokenClient(
        signer,
        token_endpoint=server.url + "/token",
        client_id="client-1",
        client_secret=secret,
        auth_method=auth_method,  # type: ignore[arg-type]
        timeout=(2, 2),
    )
    with requests_mod.DPoPSession(client, raise_on_rejection=True) as session:
        assert session.get(server.url + "/api?q=1").status_code == 200
        with pytest.raises(errors.UnauthorizedError) as info:
            session.get(server.url + "/denied")
    text = debug_logs.text + str(info.value) + repr(info.value)
    assert "---- Sending ----" in debug_logs.text  # the DEBUG trace really ran
    leaked = [*basic_forms(CLIENT_SECRET), ACCESS_TOKEN, *sent_credentials(server)]
    assert_absent(text, leaked + private_material(signer), f"DEBUG logs ({auth_method})")


def test_httpx_flow_debug_logs_hold_no_secret(
    signer: SoftwareSigner, server: RawServer, debug_logs: pytest.LogCaptureFixture
) -> None:
    httpx = pytest.importorskip("httpx")
    httpx_mod = pytest.importorskip("dpop_hsm.httpx")
    client = TokenClient(
        signer,
        token_endpoint=server.url + "/token",
        client_id="client-1",
        client_secret=CLIENT_SECRET,
        auth_method="client_secret_post",
    )
    with httpx.Client(timeout=2) as http:
        httpx_mod.DPoPAuth(client, raise_on_rejection=True).attach(http)
        assert http.get(server.url + "/api").status_code == 200
        with pytest.raises(errors.UnauthorizedError):
            http.get(server.url + "/denied")
    leaked = [*basic_forms(CLIENT_SECRET), ACCESS_TOKEN, *sent_credentials(server)]
    assert_absent(debug_logs.text, leaked + private_material(signer), "httpx DEBUG logs")


# Regression (found by this suite): text/* bodies were logged verbatim, token included.
@pytest.mark.parametrize("content_type", ["text/plain", "text/html; charset=utf-8"])
def test_token_response_with_a_text_content_type_is_still_masked(
    signer: SoftwareSigner, debug_logs: pytest.LogCaptureFixture, content_type: str
) -> None:
    srv = RawServer(
        lambda seen, conn, i: conn.sendall(response(200, TOKEN_JSON, content_type=content_type))
    )
    try:
        client = TokenClient(
            signer,
            token_endpoint=srv.url + "/token",
            client_id="client-1",
            client_secret=CLIENT_SECRET,
            timeout=(2, 2),
        )
        with contextlib.suppress(DPoPError):
            client.get_token()
    finally:
        srv.close()
    assert_absent(debug_logs.text, [ACCESS_TOKEN], f"DEBUG log of a {content_type} token response")


def test_errors_from_a_rejecting_token_endpoint_hold_no_secret(
    signer: SoftwareSigner, debug_logs: pytest.LogCaptureFixture
) -> None:
    body = json.dumps({"error": "invalid_client", "error_description": "bad secret"}).encode()
    srv = RawServer(lambda seen, conn, i: conn.sendall(response(401, body)))
    try:
        client = TokenClient(
            signer,
            token_endpoint=srv.url + "/token",
            client_id="client-1",
            client_secret=CLIENT_SECRET,
            auth_method="client_secret_post",
        )
        with pytest.raises(errors.OAuthError) as info:
            client.get_token()
    finally:
        srv.close()
    text = str(info.value) + repr(info.value) + info.value.diagnostics() + debug_logs.text
    assert_absent(text, [*basic_forms(CLIENT_SECRET), *sent_credentials(srv)], "OAuthError")


# --- hardware signers (when their fixtures are available) ----------------------------------


@pytest.mark.softhsm
def test_pkcs11_signer_shows_no_pin(softhsm: Any, debug_logs: pytest.LogCaptureFixture) -> None:
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    label = "nosecrets-" + secrets.token_hex(4)
    uri = softhsm.uri(token="spare", object=label)
    shown: list[str] = []
    with Pkcs11Signer.generate(uri, secret=softhsm.pin) as hsm:
        proof = ProofFactory(hsm).create("GET", "https://rs.example.com/")
        shown += [repr(hsm), str(hsm), hsm.uri, json.dumps(dict(hsm.public_jwk))]
    with_pin_value = softhsm.uri(token="spare", object=label) + "&pin-value=" + softhsm.pin
    with Pkcs11Signer(with_pin_value) as hsm:
        shown += [repr(hsm), str(hsm), hsm.uri]
    for bad in (softhsm.uri(token="spare", object="absent-" + label), softhsm.uri(token="nope")):
        with pytest.raises(DPoPError) as info:
            Pkcs11Signer(bad, secret=softhsm.pin)
        shown += [str(info.value), repr(info.value), info.value.diagnostics()]
    shown.append(debug_logs.text)
    assert_absent("\n".join(shown), [softhsm.pin, softhsm.so_pin, proof], "PKCS#11 signer")


@pytest.mark.tpm
def test_tpm_signer_shows_no_auth_value(
    swtpm: Any, tmp_path: Path, debug_logs: pytest.LogCaptureFixture
) -> None:
    auth = "tpm-" + secrets.token_hex(10)
    with dpop_hsm.TpmSigner.generate(
        tcti=swtpm.tcti, blob_path=tmp_path / "k.tss", auth=auth
    ) as tpm:
        proof = ProofFactory(tpm).create("GET", "https://rs.example.com/")
        shown = [repr(tpm), str(tpm), json.dumps(dict(tpm.public_jwk))]
    shown.append(debug_logs.text)
    assert_absent("\n".join(shown), [auth, proof], "TPM signer")


# --- plain HTTP only for loopback ----------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://as.example.com/token",
        "HTTP://AS.EXAMPLE.COM/token",
        "http://127.0.0.1.nip.io/token",
        "http://localhost.example.com/token",
        "http://10.0.0.1/token",
        "http://[::ffff:10.0.0.1]/token",
        "http://192.168.1.1:8080/token",
    ],
)
def test_plain_http_token_endpoint_refused_unless_loopback(
    signer: SoftwareSigner, url: str
) -> None:
    with pytest.raises(InsecureEndpointError) as info:
        TokenClient(signer, token_endpoint=url, client_id="c", client_secret=CLIENT_SECRET)
    assert_absent(str(info.value), [CLIENT_SECRET], "InsecureEndpointError")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/token",
        "http://127.0.0.1:8080/token",
        "http://localhost:9/token",
        "http://[::1]:9/token",
        "https://as.example.com/token",
    ],
)
def test_loopback_http_and_https_are_accepted(signer: SoftwareSigner, url: str) -> None:
    client = TokenClient(signer, token_endpoint=url, client_id="c", client_secret=CLIENT_SECRET)
    assert client.token_endpoint == url


def _proxy_recorder() -> RawServer:
    """An HTTP proxy on 127.0.0.1 that records what would have gone to the remote host."""

    def handler(seen: Seen, conn: socket.socket, index: int) -> None:
        body = TOKEN_JSON if seen.path.endswith("/token") else b"{}"
        conn.sendall(response(200, body))

    return RawServer(handler)


# Regression (found by this suite, fixed in 600692e): both adapters stamped a token and a proof
# on plain-http requests to non-loopback resource servers.
def test_requests_adapter_refuses_plain_http_to_a_remote_resource_server(
    signer: SoftwareSigner,
) -> None:
    proxy = _proxy_recorder()  # stands in for the network: nothing leaves this machine
    try:
        client = TokenClient(
            signer, token_endpoint=proxy.url + "/token", client_id="c", client_secret=CLIENT_SECRET
        )
        with requests_mod.DPoPSession(client) as session:
            session.proxies = {"http": proxy.url}
            session.trust_env = False
            with pytest.raises(InsecureEndpointError):
                session.get("http://rs.example.com/api", timeout=2)
    finally:
        proxy.close()
    remote = [s for s in proxy.seen if "rs.example.com" in s.path]
    assert all(s.header("Authorization") is None and s.header("DPoP") is None for s in remote)
    assert remote == []


def test_httpx_adapter_refuses_plain_http_to_a_remote_resource_server(
    signer: SoftwareSigner,
) -> None:
    httpx = pytest.importorskip("httpx")
    httpx_mod = pytest.importorskip("dpop_hsm.httpx")
    proxy = _proxy_recorder()
    try:
        client = TokenClient(
            signer, token_endpoint=proxy.url + "/token", client_id="c", client_secret=CLIENT_SECRET
        )
        with httpx.Client(proxy=proxy.url, trust_env=False, timeout=2) as http:
            httpx_mod.DPoPAuth(client).attach(http)
            with pytest.raises(InsecureEndpointError):
                http.get("http://rs.example.com/api")
    finally:
        proxy.close()
    remote = [s for s in proxy.seen if "rs.example.com" in s.path]
    assert remote == []


def test_reprs_are_checked_for_every_public_name() -> None:
    """The walk above covers the public surface: a new public class must be added here."""
    covered = {
        "DPoPAuth",
        "DPoPSession",
        "Pkcs11Signer",
        "ProofFactory",
        "ReplayCache",
        "Signer",
        "SoftwareSigner",
        "Token",
        "TokenClient",
        "TpmSigner",
        "VerifiedProof",
    }
    public_classes = {
        name for name in dpop_hsm.__all__ if name not in errors.__all__ and name[:1].isupper()
    }
    assert public_classes <= covered, f"not checked for secrets: {public_classes - covered}"
