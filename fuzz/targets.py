"""Coverage-guided fuzz targets: one per parser that sees input we did not write.

Each target is a function ``bytes -> None`` that feeds the bytes to one parser and lets through
only the outcomes the parser promises: a value (checked for consistency where a round trip
exists) or one of our typed errors. Anything else — a bare ValueError, KeyError, TypeError,
IndexError, RecursionError, a failed consistency assertion — propagates, and atheris/libFuzzer
records it as a crash.

Targets import the module under test lazily (inside ``prepare``), so ``scripts/fuzz.py`` can
instrument those imports for coverage, and targets whose module has not landed yet are listed as
unavailable instead of failing. Seeds come from the RFC test vectors in ``tests/vectors`` and
from valid inputs generated at start (fresh proofs, keys, URIs, headers).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
HTU = "https://rs.example.com/resource"
NOW = 1_700_000_000.0
# The access token the verify targets bind proofs to: a fixture, not a secret.
TOKEN = "tok"  # noqa: S105

FuzzOne = Callable[[bytes], None]


@dataclass(frozen=True)
class Target:
    """A fuzz target: ``prepare()`` imports the parser and returns the per-input function."""

    name: str
    module: str  # the dpop_hsm module under test (must exist for the target to be available)
    prepare: Callable[[], FuzzOne]
    seeds: Callable[[], list[bytes]]
    max_len: int = 4096
    notes: str = field(default="", compare=False)

    def available(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except ImportError:
            return False


def _vectors(name: str) -> Any:
    path = VECTORS / name
    return json.loads(path.read_text()) if path.exists() else {}


# --- DER -> raw ----------------------------------------------------------------------------


def _prepare_der() -> FuzzOne:
    from dpop_hsm.ecdsa import der_to_raw, raw_to_der
    from dpop_hsm.errors import SignatureEncodingError

    sizes = (32, 48, 66, 0, 64)

    def one(data: bytes) -> None:
        if not data:
            return
        size, der = sizes[data[0] % len(sizes)], data[1:]
        try:
            raw = der_to_raw(der, size)
        except SignatureEncodingError:
            pass
        else:
            assert len(raw) == 2 * size
            assert raw_to_der(raw) == der, "accepted DER is not canonical"
        try:
            back = raw_to_der(der)
        except SignatureEncodingError:
            return
        assert der_to_raw(back, len(der) // 2) == der

    return one


def _seeds_der() -> list[bytes]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    seeds = []
    for sig in _vectors("rfc6979.json").get("signatures", []):
        der = encode_dss_signature(int(sig["r"], 16), int(sig["s"], 16))
        seeds.append(b"\x00" + der)
    for index, curve in enumerate((ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1())):
        key = ec.generate_private_key(curve)
        seeds.append(bytes([index]) + key.sign(b"seed", ec.ECDSA(hashes.SHA256())))
    return seeds


# --- base64url -----------------------------------------------------------------------------


def _prepare_b64url() -> FuzzOne:
    from dpop_hsm.jose import b64url_decode, b64url_encode

    def one(data: bytes) -> None:
        # bytes path, and a str path (surrogateescape keeps every byte as one character)
        for value in (data, data.decode("utf-8", "surrogateescape")):
            try:
                decoded = b64url_decode(value)
            except ValueError:  # the documented contract; callers wrap it
                continue
            text = value if isinstance(value, str) else value.decode("ascii")
            assert b64url_encode(decoded) == text, "two spellings of one byte string"

    return one


def _seeds_b64url() -> list[bytes]:
    seeds = [b"", b"AA", b"AAA", b"AAAA", b"_-_-", b"QQ=="]
    for proof in _vectors("rfc9449.json").get("proofs", []):
        seeds.extend(part.encode() for part in proof["proof"].split("."))
    return seeds


# --- verify_proof: raw proof text ----------------------------------------------------------


def _check_verified(verified: Any, verify_again: Callable[[], object]) -> None:
    """Oracles for an accepted proof: the rules hold for what passed, and a replay fails."""
    from dpop_hsm.errors import ReplayError

    jwk = verified.header["jwk"]
    if jwk.get("kty") == "RSA":  # NIST SP 800-56B: odd 2^16 < e < 2^256; 2048..8192-bit n
        from dpop_hsm.jose import b64url_decode

        e = int.from_bytes(b64url_decode(jwk["e"]), "big")
        n = int.from_bytes(b64url_decode(jwk["n"]), "big")
        assert 2**16 < e < 2**256 and e % 2 == 1, "RSA exponent out of bounds accepted"
        assert 2048 <= n.bit_length() <= 8192, "RSA modulus size out of bounds accepted"
    try:
        verify_again()
    except ReplayError:
        return
    raise AssertionError("the same proof verified twice with one replay cache")


def _prepare_verify() -> FuzzOne:
    from dpop_hsm.errors import VerificationError
    from dpop_hsm.verify import ReplayCache, verify_proof

    def one(data: bytes) -> None:
        proof = data.decode("latin-1")
        for access_token in (None, TOKEN):
            cache = ReplayCache(max_entries=64)  # per input: accepting must not depend on history

            def again(access_token: str | None = access_token, cache: Any = cache) -> object:
                return verify_proof(
                    proof, htm="GET", htu=HTU, access_token=access_token, now=NOW,
                    replay_cache=cache,
                )  # fmt: skip

            try:
                verified = again()
            except VerificationError:
                continue
            _check_verified(verified, again)

    return one


def _seeds_verify() -> list[bytes]:
    from dpop_hsm.proof import ProofFactory
    from dpop_hsm.signers.software import SoftwareSigner

    seeds = [p["proof"].encode() for p in _vectors("rfc9449.json").get("proofs", [])]
    for alg in ("ES256", "ES384", "ES512", "EdDSA", "PS256"):
        factory = ProofFactory(SoftwareSigner.generate(alg), clock=lambda: NOW)
        seeds.append(factory.create("GET", HTU).encode())
        seeds.append(factory.create("GET", HTU, access_token=TOKEN, nonce="n-1").encode())
    return seeds


# --- verify_proof: structure-aware, validly signed -----------------------------------------


def _prepare_verify_signed() -> FuzzOne:
    """Header and payload JSON come from the fuzzer and are *validly signed* here, so the
    claim checks behind the signature check get exercised (an attacker signs with their own
    key, so everything after the signature is attacker-reachable).

    Input: header bytes, NUL, payload bytes, and optionally NUL and an access token (read as
    latin-1, as http.server hands over header bytes). The bytes are signed as they are, so
    non-UTF-8, BOMs and duplicate members reach the JSON reader; "$JWK" in the header stands
    for this target's ES256 public key and "$RSAJWK" for its RSA key (then signed with RS256).
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    from dpop_hsm.errors import VerificationError
    from dpop_hsm.jose import b64url_encode
    from dpop_hsm.signers.software import SoftwareSigner, public_jwk_of
    from dpop_hsm.strict_json import loads_strict
    from dpop_hsm.verify import ReplayCache, verify_proof

    signer = SoftwareSigner.generate("ES256")
    jwk_text = json.dumps(dict(signer.public_jwk), separators=(",", ":")).encode()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_text = json.dumps(public_jwk_of(rsa_key.public_key()), separators=(",", ":")).encode()

    def sign(signing_input: bytes, with_rsa: bool) -> bytes:
        if with_rsa:
            return rsa_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return signer.sign(signing_input)

    def one(data: bytes) -> None:
        header, _, rest = data.partition(b"\x00")
        payload, _, token_bytes = rest.partition(b"\x00")
        with_rsa = b'"$RSAJWK"' in header
        header = header.replace(b'"$JWK"', jwk_text).replace(b'"$RSAJWK"', rsa_text)
        signing_input = b64url_encode(header) + "." + b64url_encode(payload)
        proof = signing_input + "." + b64url_encode(sign(signing_input.encode("ascii"), with_rsa))
        tokens: list[str | None] = [None, TOKEN]
        if token_bytes:
            tokens.append(token_bytes.decode("latin-1"))
        for access_token in tokens:
            nonce = None if access_token is None else "n-1"
            cache = ReplayCache(max_entries=64)

            def again(
                access_token: str | None = access_token,
                nonce: str | None = nonce,
                cache: Any = cache,
            ) -> object:
                return verify_proof(
                    proof, htm="GET", htu=HTU, access_token=access_token, nonce=nonce, now=NOW,
                    replay_cache=cache,
                )  # fmt: skip

            try:
                verified: Any = again()
            except VerificationError:
                continue
            # Accepted bytes are strict JSON, and the lenient stdlib reads the same claims.
            assert loads_strict(payload) == verified.claims == json.loads(payload)
            assert loads_strict(header) == verified.header
            _check_verified(verified, again)

    return one


def _seeds_verify_signed() -> list[bytes]:
    from dpop_hsm.proof import access_token_hash

    header = b'{"typ":"dpop+jwt","alg":"ES256","jwk":"$JWK"}'
    claims: list[dict[str, Any]] = [
        {"jti": "j1", "htm": "GET", "htu": HTU, "iat": int(NOW)},
        {
            "jti": "j2",
            "htm": "GET",
            "htu": HTU + "?q=1",
            "iat": int(NOW) - 3,
            "ath": access_token_hash(TOKEN),
            "nonce": "n-1",
        },
        {"jti": "j3", "htm": "GET", "htu": "HTTPS://RS.example.com:443/%72esource", "iat": NOW},
    ]
    seeds = [header + b"\x00" + json.dumps(c, separators=(",", ":")).encode() for c in claims]
    good = json.dumps(claims[0], separators=(",", ":"))
    seeds += [
        # The strict JSON rules (RFC 8259 §4, §6, §8.1): none of these may verify.
        header + b"\x00\xef\xbb\xbf" + good.encode(),
        header + b"\x00" + good.encode("utf-16"),
        header + b"\x00" + good[:-1].encode() + b',"htm":"POST"}',
        header + b"\x00" + good[:-1].encode() + b',"x":NaN}',
        header + b"\x00" + good.replace(str(int(NOW)), "1e400").encode(),
        header[:-1] + b',"alg":"ES256"}\x00' + good.encode(),
        b"\xef\xbb\xbf" + header + b"\x00" + good.encode(),
        # RSA: the target's own key verifies; a huge or even exponent may never get that far.
        b'{"typ":"dpop+jwt","alg":"RS256","jwk":"$RSAJWK"}\x00' + good.encode(),
        b'{"typ":"dpop+jwt","alg":"RS256","jwk":'
        + _rsa_jwk_text(e=(1 << 3070) | 1)
        + b"}\x00"
        + good.encode(),
        b'{"typ":"dpop+jwt","alg":"RS256","jwk":'
        + _rsa_jwk_text(e=65538)
        + b"}\x00"
        + good.encode(),
        # A third part is the access token, as the request carried it.
        header + b"\x00" + json.dumps(claims[1]).encode() + b"\x00t\xf6k\xe9n",
    ]
    return seeds


def _rsa_jwk_text(*, e: int, n_bits: int = 3072, leading_zero: bool = False) -> bytes:
    """An RSA public JWK with any exponent (no private key needed: it is refused unverified)."""
    import secrets

    from dpop_hsm.jose import b64url_encode

    n = secrets.randbits(n_bits) | 1 | (1 << (n_bits - 1))
    n_raw = (b"\x00" if leading_zero else b"") + n.to_bytes(n_bits // 8, "big")
    e_raw = e.to_bytes(max(1, (e.bit_length() + 7) // 8), "big")
    jwk = {"kty": "RSA", "n": b64url_encode(n_raw), "e": b64url_encode(e_raw)}
    return json.dumps(jwk, separators=(",", ":")).encode()


# --- JWK -> public key (and the private-JWK / key-file parser) -----------------------------


def _prepare_jwk() -> FuzzOne:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from dpop_hsm.errors import DPoPError
    from dpop_hsm.jose import jwk_thumbprint
    from dpop_hsm.strict_json import StrictJsonError, loads_strict
    from dpop_hsm.verify import public_key_from_jwk

    def one(data: bytes) -> None:
        try:
            value = loads_strict(data)  # the reader verify_proof uses for the header
        except StrictJsonError:
            return  # not JSON we accept: the JSON reader's business, not ours
        try:
            key = public_key_from_jwk(value)
        except DPoPError:
            key = None
        if isinstance(key, rsa.RSAPublicKey):
            e = key.public_numbers().e
            assert 2**16 < e < 2**256 and e % 2, "RSA exponent out of bounds accepted"
            assert 2048 <= key.key_size <= 8192, "RSA modulus size out of bounds accepted"
        if isinstance(value, dict):
            with contextlib.suppress(DPoPError):
                jwk_thumbprint(value)

    return one


def _seeds_jwk() -> list[bytes]:
    from dpop_hsm.signers.software import SoftwareSigner

    seeds = []
    jwk = _vectors("rfc9449.json").get("example_public_jwk", {}).get("jwk")
    if jwk:
        seeds.append(json.dumps(jwk).encode())
    for alg in ("ES256", "ES384", "ES512", "EdDSA", "PS256"):
        seeds.append(json.dumps(dict(SoftwareSigner.generate(alg).public_jwk)).encode())
    seeds += [
        _rsa_jwk_text(e=65537),
        _rsa_jwk_text(e=(1 << 3070) | 1),  # the 3071-bit exponent: ~100x the verification cost
        _rsa_jwk_text(e=2**256 + 1),
        _rsa_jwk_text(e=2**256 - 1),
        _rsa_jwk_text(e=65538),
        _rsa_jwk_text(e=3),
        _rsa_jwk_text(e=65537, n_bits=8200),
        _rsa_jwk_text(e=65537, n_bits=2040),
        _rsa_jwk_text(e=65537, leading_zero=True),
    ]
    return seeds


def _prepare_key_bytes() -> FuzzOne:
    from dpop_hsm.errors import DPoPError
    from dpop_hsm.signers.software import SoftwareSigner

    def one(data: bytes) -> None:
        with contextlib.suppress(DPoPError):
            SoftwareSigner.from_bytes(data)

    return one


def _seeds_key_bytes() -> list[bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    numbers = key.private_numbers()

    def b64(v: int) -> str:
        from dpop_hsm.jose import b64url_encode

        return b64url_encode(v.to_bytes(32, "big"))

    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64(numbers.public_numbers.x),
        "y": b64(numbers.public_numbers.y),
        "d": b64(numbers.private_value),
    }
    return [pem, der, json.dumps(jwk).encode()]


# --- htu normalization and the plain-http loopback test ------------------------------------


def _prepare_htu() -> FuzzOne:
    import ipaddress
    from urllib.parse import urlsplit

    import urllib3.util

    from dpop_hsm.errors import ConfigurationError
    from dpop_hsm.htu import comparable_htu, is_loopback_host, normalize_htu, origin_of

    def one(data: bytes) -> None:
        url = data.decode("utf-8", "surrogateescape")
        for function in (normalize_htu, comparable_htu, origin_of):
            try:
                result = function(url)
            except ConfigurationError:
                continue
            assert result.startswith(("http://", "https://"))
            assert "?" not in result and "#" not in result
        try:
            normalize_htu(url)
        except ConfigurationError:
            accepted = False
        else:
            accepted = True
        if accepted:
            # What we accept, the transport must read the same way: no parser differential.
            assert not any(c <= " " or c in "\\\x7f" for c in url)
            assert "@" not in urlsplit(url).netloc
            try:
                theirs = (urllib3.util.parse_url(url).host or "").lower().strip("[]")
            except ValueError:
                theirs = None  # urllib3 refuses it outright: it is never sent anywhere
            if theirs is not None:
                assert theirs == (urlsplit(url).hostname or "").lower(), url
        if is_loopback_host(url):  # a real loopback literal, or the name localhost itself
            assert accepted
            host = urlsplit(url).hostname or ""
            if host != "localhost":
                assert ipaddress.ip_address(host).is_loopback

    return one


def _seeds_htu() -> list[bytes]:
    return [
        b"https://rs.example.com/resource?q=1#f",
        b"HTTPS://RS.Example.COM:443/%7euser/a%2Fb",
        b"http://127.0.0.1:8080/token",
        b"http://[::1]:9/x",
        b"http://localhost/",
        b"http://user:pw@host:99999/",
        b"http://evil.example\\@127.0.0.1:9/token",
        b"http://127.0.0.1\t.evil.example/token",
        b"http://api.localhost/",
        b"https://rs.example.com/a/../b/./c",
    ]


# --- parsers that land with other issues (available once their module exists) --------------


def _prepare_pkcs11_uri() -> FuzzOne:
    from dpop_hsm.errors import KeyReferenceError
    from dpop_hsm.signers.pkcs11_uri import Pkcs11Uri

    def one(data: bytes) -> None:
        # surrogateescape: a non-UTF-8 command-line argument reaches us exactly like this.
        text = data.decode("utf-8", "surrogateescape")
        try:
            parsed = Pkcs11Uri.parse(text)
        except KeyReferenceError:
            return
        again = Pkcs11Uri.parse(parsed.to_string(include_pin=True))
        assert again == parsed, "pkcs11 URI does not round-trip"
        assert Pkcs11Uri.parse(str(parsed)).pin_value is None, "str() kept the pin-value"

    return one


def _seeds_pkcs11_uri() -> list[bytes]:
    return [
        b"pkcs11:token=dpop;object=dpop-key;type=private",
        b"pkcs11:token=My%20Token;id=%01%02;slot-id=0?pin-source=env:PIN",
        b"pkcs11:model=PKCS%2315%20emulated;manufacturer=piv_II;serial=00000000;"
        b"token=YubiKey%20PIV;id=%02;object=SIGN%20key;type=private"
        b"?module-path=/usr/lib/libykcs11.so&pin-value=123456",
        b"pkcs11:object=a;object=b",
        b"pkcs11:",
    ]


def _prepare_www_authenticate() -> FuzzOne:
    from dpop_hsm.challenges import ChallengeParseError, find_challenge, parse_www_authenticate

    def one(data: bytes) -> None:
        text = data.decode("latin-1")  # what http.client hands over for non-ASCII header bytes
        fields = text.split("\n")  # several header fields, as a response may carry
        try:
            parsed = parse_www_authenticate(fields)
        except ChallengeParseError:
            assert find_challenge(fields) is None
            return
        for challenge in parsed:
            assert challenge.scheme, "empty auth-scheme accepted"
            assert all(name == name.lower() for name in challenge.params)

    return one


def _seeds_www_authenticate() -> list[bytes]:
    return [
        b'DPoP error="use_dpop_nonce", error_description="Resource server requires nonce"',
        b'Bearer realm="x", DPoP algs="ES256 PS256", error="invalid_token"',
        b'DPoP error="invalid_dpop_proof", error_description="a \\"quoted\\", comma"',
        b'Basic realm=simple, Newauth realm="apps", type=1, title="Login to \\"apps\\""',
        b"DPoP token68==",
        b"",
    ]


def _prepare_token_response() -> FuzzOne:
    """``TokenClient.parse_response``: the sans-IO parser every token response goes through."""
    import time

    from dpop_hsm.errors import DPoPError
    from dpop_hsm.signers.software import SoftwareSigner
    from dpop_hsm.token import TokenClient
    from dpop_hsm.token_http import HttpResponse

    client = TokenClient(
        SoftwareSigner.generate("ES256"),
        token_endpoint="https://as.example.com/token",  # noqa: S106 - a URL, not a secret
        client_id="fuzz",
        client_secret="fuzz-secret",  # noqa: S106 - a fixture, never sent anywhere
    )
    statuses = (200, 200, 200, 400, 401, 403, 302, 500, 201, 204)

    def one(data: bytes) -> None:
        if not data:
            return
        status, body = statuses[data[0] % len(statuses)], data[1:]
        response = HttpResponse(status, (("Content-Type", "application/json"),), body)
        try:
            token = client.parse_response(
                response, sent_monotonic=time.monotonic(), sent_wall=time.time()
            )
        except DPoPError:
            return
        assert token.token_type.lower() == "dpop", "accepted a non-DPoP token"
        assert 0 < token.lifetime < float("inf")
        if len(token.access_token) >= 16:  # shorter ones may occur in the repr by chance
            assert token.access_token not in repr(token), "repr shows the access token"

    return one


def _seeds_token_response() -> list[bytes]:
    return [b"\x00" + seed for seed in _TOKEN_BODIES] + [b"\x03" + _TOKEN_BODIES[5]]


_TOKEN_BODIES = [
    b'{"access_token":"abc","token_type":"DPoP","expires_in":3600}',
    b'{"access_token":"abc","token_type":"dpop","expires_in":"3600","scope":"a b"}',
    b'{"access_token":"abc","token_type":"Bearer","expires_in":3600}',
    b'{"access_token":"abc","token_type":"DPoP","expires_in":-1}',
    b'{"access_token":"abc","token_type":"DPoP","expires_in":1e400}',
    b'{"error":"use_dpop_nonce","error_description":"nonce"}',
    b"[]",
]


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("der", "dpop_hsm.ecdsa", _prepare_der, _seeds_der, max_len=300),
        Target("b64url", "dpop_hsm.jose", _prepare_b64url, _seeds_b64url, max_len=600),
        Target("verify", "dpop_hsm.verify", _prepare_verify, _seeds_verify, max_len=9000),
        Target(
            "verify_signed",
            "dpop_hsm.verify",
            _prepare_verify_signed,
            _seeds_verify_signed,
            max_len=4096,
        ),
        Target("jwk", "dpop_hsm.verify", _prepare_jwk, _seeds_jwk, max_len=2048),
        Target("htu", "dpop_hsm.htu", _prepare_htu, _seeds_htu, max_len=512),
        Target(
            "key_bytes",
            "dpop_hsm.signers.software",
            _prepare_key_bytes,
            _seeds_key_bytes,
            max_len=4096,
        ),
        Target(
            "pkcs11_uri",
            "dpop_hsm.signers.pkcs11_uri",
            _prepare_pkcs11_uri,
            _seeds_pkcs11_uri,
            max_len=6000,  # room for the > 4300-digit slot-id case
        ),
        Target(
            "www_authenticate",
            "dpop_hsm.challenges",
            _prepare_www_authenticate,
            _seeds_www_authenticate,
        ),
        Target("token_response", "dpop_hsm.token", _prepare_token_response, _seeds_token_response),
    )
}
