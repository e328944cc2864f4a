"""Property tests for the foundation parsers: DER <-> raw ECDSA, strict base64url, verify_proof.

The rule for every parser that sees attacker-controlled input: it returns a value or raises one
of our typed errors (``DPoPError`` subclasses) — never a bare KeyError/ValueError/TypeError/
IndexError/RecursionError — and it never hangs. ``b64url_decode`` is the one documented
exception: it raises ``ValueError`` by contract and its callers wrap it (checked below through
``verify_proof``, which is the caller an attacker reaches).

Example counts are small by default (the whole hardening suite has a time budget); set
``HYPOTHESIS_PROFILE=long`` for ~20x more examples.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dpop_hsm.ecdsa import CURVE_ORDERS, der_to_raw, raw_to_der, rs_to_raw
from dpop_hsm.errors import DPoPError, SignatureEncodingError, VerificationError
from dpop_hsm.jose import b64url_decode, b64url_encode
from dpop_hsm.proof import ProofFactory
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.verify import (
    MAX_PROOF_LENGTH,
    NO_REPLAY_CHECK,
    ReplayCache,
    VerifiedProof,
    verify_proof,
)

_LONG = os.environ.get("HYPOTHESIS_PROFILE", "") == "long"


def examples(n: int) -> int:
    """Default budget, or 20x under ``HYPOTHESIS_PROFILE=long``."""
    return n * 20 if _LONG else n


FAST = settings(deadline=2000, suppress_health_check=[HealthCheck.too_slow])
SIZES = sorted(CURVE_ORDERS)  # 32 (P-256), 48 (P-384), 66 (P-521)


# --- DER <-> raw ---------------------------------------------------------------------------


@st.composite
def curve_and_rs(draw: st.DrawFn) -> tuple[int, int, int]:
    size = draw(st.sampled_from(SIZES))
    n = CURVE_ORDERS[size]
    # Edge values (1, n-1, short integers needing padding) are where encoders break.
    scalar = st.one_of(
        st.integers(min_value=1, max_value=n - 1),
        st.sampled_from([1, 2, 127, 128, 255, 256, n - 1, n - 2, 2 ** (8 * size - 9)]).filter(
            lambda v: 0 < v < n
        ),
        st.integers(min_value=1, max_value=2**64),
    )
    return size, draw(scalar), draw(scalar)


@settings(FAST, max_examples=examples(300))
@given(curve_and_rs())
def test_der_raw_round_trip_for_every_r_s_in_range(case: tuple[int, int, int]) -> None:
    size, r, s = case
    raw = rs_to_raw(r, s, size)
    assert len(raw) == 2 * size
    der = raw_to_der(raw)
    assert der == encode_dss_signature(r, s)  # independent encoder
    assert der_to_raw(der, size) == raw
    assert int.from_bytes(raw[:size], "big") == r
    assert int.from_bytes(raw[size:], "big") == s


@settings(FAST, max_examples=examples(100))
@given(st.sampled_from(SIZES), st.integers(), st.integers())
def test_rs_out_of_range_is_a_typed_error(size: int, r: int, s: int) -> None:
    n = CURVE_ORDERS[size]
    assume(not (0 < r < n and 0 < s < n))
    with pytest.raises(SignatureEncodingError):
        rs_to_raw(r, s, size)
    if r >= 0 and s >= 0:
        with pytest.raises(SignatureEncodingError):
            der_to_raw(encode_dss_signature(r, s), size)


@settings(FAST, max_examples=examples(400))
@given(st.binary(max_size=300), st.sampled_from([*SIZES, 0, 1, 31, 64, -1]))
def test_der_to_raw_arbitrary_bytes_only_typed_errors(data: bytes, size: int) -> None:
    try:
        raw = der_to_raw(data, size)
    except SignatureEncodingError:
        return
    # Accepted input is canonical strict DER: re-encoding gives the same bytes back.
    assert len(raw) == 2 * size
    assert raw_to_der(raw) == data


@settings(FAST, max_examples=examples(200))
@given(curve_and_rs(), st.data())
def test_der_mutations_are_rejected_or_canonical(case: tuple[int, int, int], data: Any) -> None:
    size, r, s = case
    der = bytearray(encode_dss_signature(r, s))
    kind = data.draw(st.sampled_from(["flip", "truncate", "append", "length"]))
    if kind == "flip":
        i = data.draw(st.integers(0, len(der) - 1))
        der[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        der = der[: data.draw(st.integers(0, len(der) - 1))]
    elif kind == "append":
        der += data.draw(st.binary(min_size=1, max_size=4))
    else:
        der[1] = data.draw(st.integers(0, 255))
    try:
        raw = der_to_raw(bytes(der), size)
    except SignatureEncodingError:
        return
    assert raw_to_der(raw) == bytes(der)


@settings(FAST, max_examples=examples(300))
@given(st.binary(max_size=200))
def test_raw_to_der_arbitrary_bytes_only_typed_errors(raw: bytes) -> None:
    try:
        der = raw_to_der(raw)
    except SignatureEncodingError:
        return
    assert der_to_raw(der, len(raw) // 2) == raw


@pytest.mark.parametrize("bad", [None, "30060201010201", 12, b"\x30" * 10_000])
def test_der_to_raw_wrong_types_and_sizes(bad: Any) -> None:
    with pytest.raises(SignatureEncodingError):
        der_to_raw(bad, 32)


# --- base64url -----------------------------------------------------------------------------


@settings(FAST, max_examples=examples(300))
@given(st.binary(max_size=200))
def test_b64url_round_trip(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text
    assert b64url_decode(text) == data
    assert b64url_decode(text.encode("ascii")) == data


_B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@settings(FAST, max_examples=examples(500))
@given(
    st.one_of(
        st.text(max_size=80),
        st.text(alphabet=_B64_ALPHABET + "=+/ \n.", max_size=80),
        st.binary(max_size=80),
    )
)
def test_b64url_decode_arbitrary_input_bytes_or_value_error(text: str | bytes) -> None:
    try:
        decoded = b64url_decode(text)
    except ValueError:  # the documented contract (callers wrap it)
        return
    # Strict: exactly one spelling per byte string.
    expected = text if isinstance(text, str) else text.decode("ascii")
    assert b64url_encode(decoded) == expected


# --- verify_proof --------------------------------------------------------------------------

HTU = "https://rs.example.com/resource"
NOW = 1_700_000_000.0


@pytest.fixture(scope="module")
def es256() -> SoftwareSigner:
    return SoftwareSigner.generate("ES256")


@pytest.fixture(scope="module")
def eddsa() -> SoftwareSigner:
    return SoftwareSigner.generate("EdDSA")


def _json_b64(value: Any) -> str:
    # ensure_ascii: lone surrogates and any unicode survive as \\u escapes, as an attacker's
    # JSON would carry them.
    return b64url_encode(json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode())


def signed(signer: SoftwareSigner, header_b64: str, payload_b64: str) -> str:
    """A compact JWS over arbitrary (possibly hostile) parts, validly signed by ``signer``."""
    signing_input = header_b64 + "." + payload_b64
    return signing_input + "." + b64url_encode(signer.sign(signing_input.encode("ascii")))


def good_header(signer: SoftwareSigner) -> dict[str, Any]:
    return {"typ": "dpop+jwt", "alg": signer.alg, "jwk": dict(signer.public_jwk)}


def good_claims() -> dict[str, Any]:
    return {"jti": "j-1", "htm": "GET", "htu": HTU, "iat": int(NOW)}


def only_typed_errors(proof: Any, **kwargs: Any) -> VerifiedProof | None:
    """Run verify_proof; a typed verification error is fine, anything else fails the test."""
    options: dict[str, Any] = {"htm": "GET", "htu": HTU, "now": NOW}
    options.update(kwargs)
    try:
        return verify_proof(proof, **options)
    except VerificationError:
        return None


def test_baseline_proof_verifies(es256: SoftwareSigner) -> None:
    proof = ProofFactory(es256, clock=lambda: NOW).create("GET", HTU)
    assert verify_proof(proof, htm="GET", htu=HTU, now=NOW).jkt == es256.thumbprint


@settings(FAST, max_examples=examples(150))
@given(st.data())
def test_bit_flips_and_truncations_never_verify(es256: SoftwareSigner, data: Any) -> None:
    proof = ProofFactory(es256, clock=lambda: NOW).create("GET", HTU, access_token="tok")
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
    i = data.draw(st.integers(0, len(proof) - 1))
    if kind == "flip":
        mutated = (
            proof[:i] + chr(ord(proof[i]) ^ (1 << data.draw(st.integers(0, 6)))) + proof[i + 1 :]
        )
    elif kind == "truncate":
        mutated = proof[:i]
    elif kind == "insert":
        mutated = proof[:i] + data.draw(st.characters(codec="ascii")) + proof[i:]
    else:
        mutated = proof[:i] + proof[i + 1 :]
    assume(mutated != proof)
    with pytest.raises(VerificationError):
        verify_proof(mutated, htm="GET", htu=HTU, access_token="tok", now=NOW)


@settings(FAST, max_examples=examples(300))
@given(st.one_of(st.text(max_size=300), st.binary(max_size=100), st.none(), st.integers()))
def test_arbitrary_input_only_typed_errors(junk: Any) -> None:
    assert only_typed_errors(junk) is None


# JSON values of every type, nested, with hostile strings (surrogates, controls, long).
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["\ud800", "\x00", "dpop+jwt", "ES256", "EC", "P-256", "GET", HTU, "1e999"]),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
HEADER_NAMES = ["typ", "alg", "jwk", "crit", "kid", "x5c"]
CLAIM_NAMES = ["jti", "htm", "htu", "iat", "ath", "nonce", "exp"]
JWK_NAMES = ["kty", "crv", "x", "y", "n", "e", "d"]


@settings(FAST, max_examples=examples(250))
@given(
    st.data(),
    st.sampled_from(["header", "claims", "jwk"]),
    st.sampled_from(["ES256", "EdDSA"]),
)
def test_type_confusion_in_signed_proofs_only_typed_errors(
    es256: SoftwareSigner, eddsa: SoftwareSigner, data: Any, where: str, which: str
) -> None:
    signer = es256 if which == "ES256" else eddsa
    header, claims = good_header(signer), good_claims()
    target = {"header": header, "claims": claims, "jwk": header["jwk"]}[where]
    names = {"header": HEADER_NAMES, "claims": CLAIM_NAMES, "jwk": JWK_NAMES}[where]
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(names))
        if data.draw(st.booleans()):
            target[name] = data.draw(json_values)
        else:
            target.pop(name, None)
    proof = signed(signer, _json_b64(header), _json_b64(claims))
    access_token = data.draw(st.sampled_from([None, "tok"]))
    nonce = data.draw(st.sampled_from([None, "n-1", ("n-1", "n-2"), lambda v: v == "n-1"]))
    result = only_typed_errors(
        proof, access_token=access_token, nonce=nonce, replay_cache=ReplayCache(max_entries=4)
    )
    if result is not None:  # whatever passed must really satisfy the checks
        assert result.claims["htm"] == "GET"
        assert isinstance(result.claims["iat"], int | float)
        assert result.header["typ"].lower() == "dpop+jwt"


# Everything that arrives with the request is input: the access token, the token's cnf.jkt, and
# the method and URI the server read off the request line. Whatever they hold, verify_proof
# answers with a VerificationError (400/401), never ConfigurationError (a 500).
request_text = st.one_of(
    st.text(max_size=60),
    st.text(alphabet="abcAZ09-._~+/= \t\r\n\x00\u00e9\ud800\uff41", max_size=30),
    st.sampled_from(["", "tok", "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU", "tok\u00e9n"]),
)


@settings(FAST, max_examples=examples(300))
@given(
    access_token=st.one_of(st.none(), request_text),
    htm=st.one_of(st.just("GET"), request_text),
    htu=st.one_of(st.just(HTU), request_text, st.builds(lambda t: HTU + t, request_text)),
    expected_jkt=st.one_of(st.none(), request_text, json_values),
)
def test_request_side_inputs_only_raise_verification_errors(
    es256: SoftwareSigner, access_token: Any, htm: Any, htu: Any, expected_jkt: Any
) -> None:
    proof = ProofFactory(es256, clock=lambda: NOW).create("GET", HTU, access_token="tok")
    result = only_typed_errors(
        proof,
        htm=htm,
        htu=htu,
        access_token=access_token,
        expected_jkt=expected_jkt,
        replay_cache=NO_REPLAY_CHECK,
    )
    if result is not None:
        assert htm == "GET" and access_token in (None, "tok")
        assert expected_jkt in (None, es256.thumbprint)


# Regression (found by this suite): a validly signed proof whose ath or nonce claim is a JSON
# string with a lone surrogate ("\\ud800") made verify_proof raise UnicodeEncodeError.


@pytest.mark.parametrize(
    ("where", "value", "kwargs"),
    [
        ("claims", {"iat": str(int(NOW))}, {}),
        ("claims", {"iat": True}, {}),
        ("claims", {"iat": 1e400}, {}),
        ("claims", {"iat": -1e400}, {}),
        ("claims", {"iat": 10**300}, {}),
        ("claims", {"htu": ["https://rs.example.com/resource"]}, {}),
        ("claims", {"htm": {"GET": 1}}, {}),
        ("claims", {"jti": 7}, {}),
        ("claims", {"jti": "x" * 300}, {}),
        ("claims", {"ath": ["a"]}, {"access_token": "tok"}),
        pytest.param(
            "claims",
            {"ath": "\ud800"},
            {"access_token": "tok"},
            id="ath-lone-surrogate",
        ),
        pytest.param(
            "claims",
            {"nonce": "\ud800"},
            {"nonce": "n-1"},
            id="nonce-lone-surrogate",
        ),
        ("claims", {"nonce": 5}, {"nonce": "n-1"}),
        ("claims", {"htu": "https://\ud800/x"}, {}),
        ("claims", {"htu": "https://rs.example.com:99999/"}, {}),
        ("claims", {"htu": "https://[::1/"}, {}),
        ("header", {"jwk": [1, 2]}, {}),
        ("header", {"jwk": "key"}, {}),
        ("header", {"alg": ["ES256"]}, {}),
        ("header", {"alg": "none"}, {}),
        ("header", {"alg": "HS256"}, {}),
        ("header", {"typ": None}, {}),
        ("header", {"crit": ["exp"]}, {}),
        ("jwk", {"crv": ["P-256"]}, {}),
        ("jwk", {"x": 1}, {}),
        ("jwk", {"x": "\ud800" * 43}, {}),
        ("jwk", {"kty": {"EC": 1}}, {}),
        ("jwk", {"kty": "RSA", "n": "AQAB", "e": "AQAB"}, {}),
        ("jwk", {"kty": "oct", "k": "AAAA"}, {}),
        ("jwk", {"d": "AAAA"}, {}),
        ("jwk", {"y": {"deep": [[[[]]]]}}, {}),
    ],
)
def test_known_type_confusions_are_typed_errors(
    es256: SoftwareSigner, where: str, value: dict[str, Any], kwargs: dict[str, Any]
) -> None:
    header, claims = good_header(es256), good_claims()
    {"header": header, "claims": claims, "jwk": header["jwk"]}[where].update(value)
    proof = signed(es256, _json_b64(header), _json_b64(claims))
    with pytest.raises(VerificationError):
        verify_proof(proof, htm="GET", htu=HTU, now=NOW, **kwargs)


@pytest.mark.parametrize(
    "payload_json",
    [
        '{"jti":"a","jti":"b","htm":"GET","htu":"%s","iat":%d}',
        '{"jti":"a","htm":"GET","htu":"%s","iat":%d,"iat":1}',
        '{"jti":"a","htm":"GET","htu":"%s","iat":%d,"x":NaN}',
        '{"jti":"a","htm":"GET","htu":"%s","iat":%d,"x":Infinity}',
        '{"jti":"a","htm":"GET","htu":"%s","iat":%d,"x":' + "9" * 5000 + "}",
        '{"jti":"a","htm":"GET","htu":"%s","iat":%d}  trailing',
        '["jti","htm","htu","iat","%s",%d]',
    ],
)
def test_hostile_json_text_is_rejected(es256: SoftwareSigner, payload_json: str) -> None:
    text = payload_json % (HTU, int(NOW))
    proof = signed(es256, _json_b64(good_header(es256)), b64url_encode(text.encode()))
    with pytest.raises(VerificationError):
        verify_proof(proof, htm="GET", htu=HTU, now=NOW)


@pytest.mark.parametrize("depth", [50, 900, 1200, 5000])
@pytest.mark.parametrize("where", ["header", "claims"])
def test_deep_nesting_never_escapes_as_recursion_error(
    es256: SoftwareSigner, depth: int, where: str
) -> None:
    nested = "[" * depth + "]" * depth
    header_text = json.dumps(good_header(es256), separators=(",", ":"))
    claims_text = json.dumps(good_claims(), separators=(",", ":"))
    if where == "header":
        header_text = header_text[:-1] + ',"x":' + nested + "}"
    else:
        claims_text = claims_text[:-1] + ',"x":' + nested + "}"
    proof = signed(es256, b64url_encode(header_text.encode()), b64url_encode(claims_text.encode()))
    result = only_typed_errors(proof)
    if len(proof) > MAX_PROOF_LENGTH:
        assert result is None
    # Shallow nesting in an unknown member is legal JSON and may verify; deep nesting may not
    # crash the verifier (a RecursionError would propagate out of only_typed_errors).


def test_oversized_proofs_are_rejected_before_parsing() -> None:
    for size in (MAX_PROOF_LENGTH + 1, 1 << 20, 1 << 24):
        started = time.monotonic()
        with pytest.raises(VerificationError):
            verify_proof("a" * size, htm="GET", htu=HTU, now=NOW)
        assert time.monotonic() - started < 5  # bounded: no parsing of a 16 MiB string


# --- JWK -> public key ---------------------------------------------------------------------


@settings(FAST, max_examples=examples(300))
@given(
    st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"kty": st.sampled_from(["EC", "OKP", "RSA", "oct", "ec", ""])},
            optional={
                name: json_values | st.text(alphabet=_B64_ALPHABET)
                for name in JWK_NAMES
                if name != "kty"
            },
        ),
    )
)
def test_public_key_from_arbitrary_jwk_only_typed_errors(jwk: Any) -> None:
    from dpop_hsm.jose import jwk_thumbprint
    from dpop_hsm.verify import public_key_from_jwk

    try:
        key = public_key_from_jwk(jwk)
    except VerificationError:
        return
    assert key is not None
    with contextlib.suppress(DPoPError):
        assert len(b64url_decode(jwk_thumbprint(jwk))) == 32


# RSA keys set the cost of their own verification: a 3071-bit exponent costs ~100x a normal
# check. The rule (NIST SP 800-56B Rev. 2 §6.2.1): e odd, 2^16 < e < 2^256; n of 2048 to 8192
# bits, both in the fewest octets (RFC 7518 §2). Accepted exactly when the rule holds.
_RSA_N = {bits: (1 << (bits - 1)) | 0xF1 for bits in (2048, 3072, 4096, 8192)}


@settings(FAST, max_examples=examples(300))
@given(
    bits=st.sampled_from([2047, 2048, 3072, 4096, 8192, 8193]),
    e=st.one_of(
        st.integers(min_value=0, max_value=2**17),
        st.integers(min_value=2**255, max_value=2**257),
        st.integers(min_value=2**256, max_value=2**3071),  # huge exponents
        st.sampled_from([3, 65537, 2**16 - 1, 2**16 + 1, 2**256 - 1, 2**256 + 1]),
    ),
    zero_pad=st.sampled_from([None, "n", "e"]),
)
def test_rsa_jwk_accepted_exactly_within_the_bounds(
    bits: int, e: int, zero_pad: str | None
) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from dpop_hsm.verify import public_key_from_jwk

    n = _RSA_N.get(bits, (1 << (bits - 1)) | 1)

    def uint(value: int, pad: bool) -> str:
        raw = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
        return b64url_encode(b"\x00" + raw if pad else raw)

    jwk = {"kty": "RSA", "n": uint(n, zero_pad == "n"), "e": uint(e, zero_pad == "e")}
    within = 2048 <= bits <= 8192 and 2**16 < e < 2**256 and e % 2 == 1 and zero_pad is None
    try:
        key = public_key_from_jwk(jwk)
    except VerificationError:
        assert not within, (bits, e, zero_pad)
        return
    assert within, (bits, e.bit_length(), zero_pad)
    assert isinstance(key, rsa.RSAPublicKey) and key.public_numbers().e == e


# JSON that another parser could read differently never verifies (RFC 8259 §4, §6, §8.1):
# header and claims of a validly signed proof, re-encoded and with members duplicated.
@settings(FAST, max_examples=examples(200))
@given(
    where=st.sampled_from(["header", "claims"]),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-be", "utf-32"]),
    duplicate=st.one_of(st.none(), st.sampled_from(["typ", "alg", "jti", "htm", "iat", "x"])),
    extra=st.one_of(st.none(), st.text(max_size=5)),
)
def test_only_strict_json_verifies(
    es256: SoftwareSigner, where: str, encoding: str, duplicate: str | None, extra: str | None
) -> None:
    header, claims = good_header(es256), good_claims()
    if extra is not None:
        claims["extra"] = extra  # non-ASCII text makes the encodings differ byte-wise
    texts = {
        "header": json.dumps(header, separators=(",", ":"), ensure_ascii=False),
        "claims": json.dumps(claims, separators=(",", ":"), ensure_ascii=False),
    }
    target = {"header": header, "claims": claims}[where]
    if duplicate is not None:
        value = json.dumps(target.get(duplicate, "dup"), ensure_ascii=False)
        texts[where] = texts[where][:-1] + f',"{duplicate}":{value}' + "}"
        if duplicate not in target:  # a new member twice
            texts[where] = texts[where][:-1] + f',"{duplicate}":{value}' + "}"
    raw = {k: v.encode(encoding if k == where else "utf-8") for k, v in texts.items()}
    proof = signed(es256, b64url_encode(raw["header"]), b64url_encode(raw["claims"]))
    strict = encoding == "utf-8" and duplicate is None
    result = only_typed_errors(proof, replay_cache=NO_REPLAY_CHECK)
    assert (result is not None) == strict, (where, encoding, duplicate)


# --- htu normalization and the loopback test -----------------------------------------------

_URL_ALPHABET = "hHtTpPsS:/[]@%.-_~?#0123456789abc\\ \x00\u00e9\u3002\uff0e\u00b2\ud800"


@settings(FAST, max_examples=examples(500))
@given(
    st.one_of(
        st.text(alphabet=_URL_ALPHABET, max_size=40),
        st.builds(lambda rest: "https://" + rest, st.text(alphabet=_URL_ALPHABET, max_size=30)),
        st.builds(lambda rest: "http://127." + rest, st.text(alphabet=_URL_ALPHABET, max_size=12)),
    )
)
def test_htu_functions_only_typed_errors(url: str) -> None:
    from dpop_hsm.errors import ConfigurationError
    from dpop_hsm.htu import comparable_htu, is_loopback_host, normalize_htu, origin_of

    for function in (normalize_htu, comparable_htu, origin_of):
        with contextlib.suppress(ConfigurationError):
            assert function(url).startswith(("http://", "https://"))
    # Regression (found by this suite): "http://]" raised ValueError here.
    assert is_loopback_host(url) in (True, False)


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1/", True),
        ("http://127.8.9.10:81/x", True),
        ("http://[::1]:9/", True),
        ("http://localhost/", True),
        ("http://api.localhost/", False),
        ("http://]", False),
        # Regressions (found by this suite): not IP literals, so they would be DNS names.
        ("http://127.999.0.1/", False),
        ("http://127.\u00b2.0.1/", False),
        ("http://0177.0.0.1/", False),
        ("http://127.0.0.1.nip.io/", False),
        ("http://[::ffff:10.0.0.1]/", False),
    ],
)
def test_is_loopback_host_accepts_only_real_loopback_literals(url: str, loopback: bool) -> None:
    from dpop_hsm.htu import is_loopback_host

    assert is_loopback_host(url) is loopback
