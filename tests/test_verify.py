"""verify_proof: the RFC 9449 example proofs, and one test per rejection path (RFC 9449 §4.3,
§7.1, §8, §11.1), each building the bad proof and expecting the error class and ``.check``."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from dpop_hsm.errors import (
    InvalidProofError,
    ReplayError,
    TokenBindingError,
    UseDPoPNonceError,
    VerificationError,
)
from dpop_hsm.jose import b64url_encode, compact_json
from dpop_hsm.proof import ProofFactory
from dpop_hsm.signers.software import SoftwareSigner, public_jwk_of
from dpop_hsm.verify import (
    NO_REPLAY_CHECK,
    ReplayCache,
    VerifiedProof,
    default_replay_cache,
    public_key_from_jwk,
    verify_proof,
)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "rfc9449.json").read_text("utf-8"))
NOW = 1_700_000_000
HTU = "https://rs.example/resource"
TOKEN = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"

SIGNER = SoftwareSigner.generate("ES256")
JWK = dict(SIGNER.public_jwk)


def b64(data: bytes | str) -> str:
    return b64url_encode(data.encode() if isinstance(data, str) else data)


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"jti": "j-" + b64(NOW.to_bytes(8, "big")), "htm": "GET", "htu": HTU}
    base["iat"] = NOW
    base.update(over)
    return {k: v for k, v in base.items() if v is not _DROP}


def header(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"typ": "dpop+jwt", "alg": "ES256", "jwk": JWK}
    base.update(over)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def build(
    hdr: dict[str, Any] | str | None = None,
    payload: dict[str, Any] | str | None = None,
    *,
    signer: SoftwareSigner = SIGNER,
) -> str:
    """Sign any header/payload (dicts, or raw JSON text) with a real key."""
    h = hdr if hdr is not None else header()
    p = payload if payload is not None else claims()
    h_text = h if isinstance(h, str) else compact_json(h).decode()
    p_text = p if isinstance(p, str) else compact_json(p).decode()
    signing_input = b64(h_text) + "." + b64(p_text)
    return signing_input + "." + b64(signer.sign(signing_input.encode()))


def check(
    proof: Any, expected: type[VerificationError], check_name: str, **kwargs: Any
) -> VerificationError:
    options: dict[str, Any] = {"htm": "GET", "htu": HTU, "now": NOW, "replay_cache": ReplayCache()}
    options.update(kwargs)
    with pytest.raises(expected) as info:
        verify_proof(proof, **options)
    assert type(info.value) is expected
    assert info.value.check == check_name
    return info.value


def accept(proof: str, **kwargs: Any) -> VerifiedProof:
    """Verify with a fresh replay cache: tests reuse jtis, and each test stands alone."""
    options: dict[str, Any] = {"htm": "GET", "htu": HTU, "now": NOW, "replay_cache": ReplayCache()}
    options.update(kwargs)
    return verify_proof(proof, **options)


# --- accepted ---------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(VECTORS["proofs"])))
def test_rfc9449_example_proofs_verify(index: int) -> None:
    vector = VECTORS["proofs"][index]
    result = verify_proof(
        vector["proof"],
        htm=vector["htm"],
        htu=vector["htu"],
        access_token=vector["access_token"],
        now=vector["iat"],
        replay_cache=ReplayCache(),
    )
    assert result.jkt == VECTORS["example_public_jwk"]["jkt"]
    assert result.claims["jti"] == vector["jti"]
    assert result.claims["iat"] == vector["iat"]
    assert result.header["jwk"] == VECTORS["example_public_jwk"]["jwk"]
    if vector["access_token"]:
        assert result.claims["ath"] == VECTORS["ath"]["ath"]


def test_rfc9449_example_with_query_in_request_uri_and_bound_token() -> None:
    vector = VECTORS["proofs"][2]
    verify_proof(
        vector["proof"],
        htm="GET",
        htu=vector["htu"] + "?page=2#top",
        access_token=vector["access_token"],
        expected_jkt=VECTORS["example_public_jwk"]["jkt"],
        now=vector["iat"] + 30,
        replay_cache=ReplayCache(),
    )


def test_rfc9449_example_signature_tampered() -> None:
    vector = VECTORS["proofs"][0]
    h, _p, s = vector["proof"].split(".")
    tampered_payload = b64(compact_json({"jti": "x", "htm": "POST", "htu": vector["htu"],
                                          "iat": vector["iat"]}))  # fmt: skip
    check(f"{h}.{tampered_payload}.{s}", InvalidProofError, "signature", htm="POST",
          htu=vector["htu"], now=vector["iat"])  # fmt: skip


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512", "EdDSA", "PS256", "RS256"])
def test_our_proofs_verify_for_every_alg(alg: str) -> None:
    signer = SoftwareSigner.generate(alg)
    proof = ProofFactory(signer, clock=lambda: NOW).create(
        "POST", HTU + "?q=1", access_token=TOKEN, nonce="n-1"
    )
    result = verify_proof(
        proof, htm="POST", htu=HTU, access_token=TOKEN, nonce="n-1",
        expected_jkt=signer.thumbprint, now=NOW, replay_cache=ReplayCache(),
    )  # fmt: skip
    assert result.jkt == signer.thumbprint
    assert result.header["alg"] == alg


def test_nonce_collection_and_predicate_accept() -> None:
    proof = build(payload=claims(nonce="b"))
    accept(proof, nonce={"a", "b"})
    accept(proof, nonce=lambda n: n == "b")


def test_iat_window_edges_accepted() -> None:
    accept(build(payload=claims(iat=NOW + 5)))
    accept(build(payload=claims(iat=NOW - 65)))
    accept(build(payload=claims(iat=NOW + 0.5)))


# --- syntax -----------------------------------------------------------------------------------


@pytest.mark.parametrize("proof", [None, 5, b"a.b.c", ["a", "b", "c"]])
def test_non_string(proof: Any) -> None:
    check(proof, InvalidProofError, "syntax")


def test_too_long() -> None:
    proof = build(payload=claims(pad="x" * 9000))
    check(proof, InvalidProofError, "syntax")


def test_non_ascii() -> None:
    check(build() + "é", InvalidProofError, "syntax")


@pytest.mark.parametrize("shape", ["", "abc", "a.b", "a.b.c.d", ".b.c", "a..c"])
def test_not_three_parts(shape: str) -> None:
    check(shape, InvalidProofError, "syntax")


def test_bad_base64() -> None:
    h, p, s = build().split(".")
    check(f"{h}=.{p}.{s}", InvalidProofError, "syntax")
    check(f"{h}.{p}+.{s}", InvalidProofError, "syntax")
    check(f"{h}.{p}.{s}=", InvalidProofError, "syntax")
    check(f"{h}.{p}.{s[:-1]}*", InvalidProofError, "syntax")


def test_non_json_and_non_utf8() -> None:
    _, p, s = build().split(".")
    check(f"{b64('not json')}.{p}.{s}", InvalidProofError, "syntax")
    bad_utf8 = b64(b"\xff\xfe{}")
    check(f"{bad_utf8}.{p}.{s}", InvalidProofError, "syntax")
    check(build(payload='{"jti":'), InvalidProofError, "syntax")


@pytest.mark.parametrize("text", ["[]", '"dpop+jwt"', "1", "null", "true"])
def test_non_object(text: str) -> None:
    check(build(hdr=text), InvalidProofError, "syntax")
    check(build(payload=text), InvalidProofError, "syntax")


def test_duplicate_json_keys() -> None:
    jwk = compact_json(JWK).decode()
    dup_header = '{"typ":"dpop+jwt","alg":"ES256","alg":"none","jwk":' + jwk + "}"
    check(build(hdr=dup_header), InvalidProofError, "syntax")
    dup_payload = '{"jti":"a","htm":"GET","htm":"POST","htu":"' + HTU + '","iat":' + str(NOW) + "}"
    check(build(payload=dup_payload), InvalidProofError, "syntax")
    nested = '{"typ":"dpop+jwt","alg":"ES256","jwk":' + jwk[:-1] + ',"x":"dup"}}'
    check(build(hdr=nested), InvalidProofError, "syntax")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_constants(constant: str) -> None:
    payload = '{"jti":"a","htm":"GET","htu":"' + HTU + '","iat":' + constant + "}"
    check(build(payload=payload), InvalidProofError, "syntax")


# --- header -----------------------------------------------------------------------------------


@pytest.mark.parametrize("typ", [_DROP, "JWT", "at+jwt", "", None, 1, ["dpop+jwt"]])
def test_typ(typ: Any) -> None:
    check(build(hdr=header(typ=typ)), InvalidProofError, "typ")


def test_typ_case_insensitive_media_type() -> None:
    accept(build(hdr=header(typ="DPoP+JWT")))


@pytest.mark.parametrize("alg", ["none", "None", "HS256", "HS512", "ES256K", "", None, _DROP, 5])
def test_alg_not_supported(alg: Any) -> None:
    check(build(hdr=header(alg=alg)), InvalidProofError, "alg")


def test_alg_none_with_empty_signature() -> None:
    h = b64(compact_json(header(alg="none")))
    p = b64(compact_json(claims()))
    check(f"{h}.{p}.", InvalidProofError, "alg")


def test_alg_not_in_allow_list() -> None:
    check(build(), InvalidProofError, "alg", algorithms={"EdDSA", "PS256"})


@pytest.mark.parametrize(
    ("alg", "key_alg"),
    [("ES384", "ES256"), ("ES256", "ES512"), ("EdDSA", "ES256"), ("RS256", "ES256"),
     ("ES256", "EdDSA"), ("ES256", "RS256"), ("EdDSA", "PS256")],
)  # fmt: skip
def test_alg_mismatched_with_jwk(alg: str, key_alg: str) -> None:
    signer = SoftwareSigner.generate(key_alg)
    proof = build(hdr=header(alg=alg, jwk=dict(signer.public_jwk)), signer=signer)
    check(proof, InvalidProofError, "alg")


def test_crit_present() -> None:
    check(build(hdr=header(crit=["exp"])), InvalidProofError, "syntax")


# --- jwk --------------------------------------------------------------------------------------


@pytest.mark.parametrize("jwk", [_DROP, None, "jwk", [JWK], 5])
def test_jwk_missing_or_not_object(jwk: Any) -> None:
    check(build(hdr=header(jwk=jwk)), InvalidProofError, "jwk")


@pytest.mark.parametrize("member", ["d", "p", "q", "dp", "dq", "qi", "oth", "k"])
def test_jwk_private_members(member: str) -> None:
    err = check(
        build(hdr=header(jwk={**JWK, member: "c2VjcmV0LXZhbHVl"})), InvalidProofError, "jwk"
    )
    assert "c2VjcmV0LXZhbHVl" not in str(err)


def test_jwk_symmetric() -> None:
    check(build(hdr=header(jwk={"kty": "oct", "k": "AAAA"})), InvalidProofError, "jwk")


@pytest.mark.parametrize("crv", ["P-192", "secp256k1", "P-256K", "Ed448", "X25519", None, 5])
def test_jwk_bad_curve(crv: Any) -> None:
    kty = "OKP" if crv in ("Ed448", "X25519") else "EC"
    check(build(hdr=header(jwk={**JWK, "kty": kty, "crv": crv})), InvalidProofError, "jwk")


def test_jwk_unknown_kty() -> None:
    check(build(hdr=header(jwk={**JWK, "kty": "DSA"})), InvalidProofError, "jwk")
    check(
        build(hdr=header(jwk={"crv": "P-256", "x": JWK["x"], "y": JWK["y"]})),
        InvalidProofError,
        "jwk",
    )


def test_jwk_off_curve_point() -> None:
    y = int.from_bytes(_b64d(JWK["y"]), "big") ^ 1
    off = {**JWK, "y": b64(y.to_bytes(32, "big"))}
    check(build(hdr=header(jwk=off)), InvalidProofError, "jwk")


def test_jwk_short_coordinate() -> None:
    """RFC 7518 §6.2.1.2: coordinates are full length; a stripped leading zero changes the jkt."""
    x = int.from_bytes(_b64d(JWK["x"]), "big")
    short = {**JWK, "x": b64(x.to_bytes(32, "big").lstrip(b"\0")[:31])}
    check(build(hdr=header(jwk=short)), InvalidProofError, "jwk")
    long = {**JWK, "x": b64(b"\0" + x.to_bytes(32, "big"))}
    check(build(hdr=header(jwk=long)), InvalidProofError, "jwk")
    check(build(hdr=header(jwk={**JWK, "x": 5})), InvalidProofError, "jwk")


def test_jwk_bad_coordinate_encoding() -> None:
    check(build(hdr=header(jwk={**JWK, "x": JWK["x"][:-1] + "+"})), InvalidProofError, "jwk")


def test_jwk_rsa_too_short() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    jwk = public_jwk_of(key.public_key())
    check(build(hdr=header(alg="RS256", jwk=jwk)), InvalidProofError, "jwk")


def test_jwk_okp_malformed() -> None:
    check(build(hdr=header(alg="EdDSA", jwk={"kty": "OKP", "crv": "Ed25519", "x": "AAAA"})),
          InvalidProofError, "jwk")  # fmt: skip


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- signature --------------------------------------------------------------------------------


def test_empty_signature() -> None:
    h, p, _ = build().split(".")
    check(f"{h}.{p}.", InvalidProofError, "signature")


def test_bad_signature() -> None:
    other = SoftwareSigner.generate("ES256")
    check(build(signer=other), InvalidProofError, "signature")  # signed by another key
    h, p, s = build().split(".")
    sig = bytearray(_b64d(s))
    sig[10] ^= 1
    check(f"{h}.{p}.{b64(bytes(sig))}", InvalidProofError, "signature")


@pytest.mark.parametrize("length", [1, 63, 65, 70, 72, 96, 132])
def test_wrong_length_ecdsa_signature(length: int) -> None:
    h, p, _ = build().split(".")
    sig = b64(bytes([1]) * length)
    check(f"{h}.{p}.{sig}", InvalidProofError, "signature")


def test_der_signature_instead_of_raw() -> None:
    """A DER ECDSA signature (what cryptography and some HSMs return) is not a JWS signature."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = public_jwk_of(key.public_key())
    signing_input = b64(compact_json(header(jwk=jwk))) + "." + b64(compact_json(claims()))
    der = key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    check(f"{signing_input}.{b64(der)}", InvalidProofError, "signature")


@pytest.mark.parametrize("which", ["r0", "s0", "rn", "sn", "rmax"])
def test_r_s_out_of_range(which: str) -> None:
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    r, s = {"r0": (0, 1), "s0": (1, 0), "rn": (n, 1), "sn": (1, n), "rmax": (2**256 - 1, 1)}[which]
    h, p, _ = build().split(".")
    sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    check(f"{h}.{p}.{b64(sig)}", InvalidProofError, "signature")


# --- claims -----------------------------------------------------------------------------------


@pytest.mark.parametrize("htm", ["POST", "get", "", None, _DROP, ["GET"]])
def test_htm(htm: Any) -> None:
    check(build(payload=claims(htm=htm)), InvalidProofError, "htm")


@pytest.mark.parametrize(
    "htu",
    ["https://rs.example/other", "http://rs.example/resource", "https://evil.example/resource",
     "https://rs.example:8443/resource", "https://rs.example/resource/", "ftp://rs.example/resource",
     "not a uri", None, 5, _DROP],
)  # fmt: skip
def test_htu(htu: Any) -> None:
    check(build(payload=claims(htu=htu)), InvalidProofError, "htu")


def test_htu_normalized_forms_match() -> None:
    proof = build(payload=claims(htu="HTTPS://RS.Example:443/resource"))
    accept(proof, htu="https://rs.example/resource?x#y")
    proof = build(payload=claims(htu="https://rs.example/%7Euser"))
    accept(proof, htu="https://rs.example/~user")


@pytest.mark.parametrize("iat", [_DROP, None, str(NOW), True, False, [NOW], {"t": NOW}])
def test_iat_missing_or_wrong_type(iat: Any) -> None:
    check(build(payload=claims(iat=iat)), InvalidProofError, "iat")


def test_iat_future() -> None:
    check(build(payload=claims(iat=NOW + 6)), InvalidProofError, "iat")
    check(build(payload=claims(iat=NOW + 1)), InvalidProofError, "iat", leeway=0)


def test_iat_too_old() -> None:
    check(build(payload=claims(iat=NOW - 66)), InvalidProofError, "iat")
    check(build(payload=claims(iat=NOW - 11)), InvalidProofError, "iat", max_age=10, leeway=0)


@pytest.mark.parametrize("jti", [_DROP, "", None, 5, "x" * 257, ["a"]])
def test_jti(jti: Any) -> None:
    check(build(payload=claims(jti=jti)), InvalidProofError, "jti")


def test_ath_missing() -> None:
    check(build(), InvalidProofError, "ath", access_token=TOKEN)
    check(build(payload=claims(ath=5)), InvalidProofError, "ath", access_token=TOKEN)


def test_ath_wrong() -> None:
    proof = build(payload=claims(ath=VECTORS["ath"]["ath"]))
    err = check(proof, InvalidProofError, "ath", access_token="another-token-value")
    assert "another-token-value" not in str(err)


def test_cnf_mismatch() -> None:
    other = SoftwareSigner.generate("ES256").thumbprint
    err = check(build(), TokenBindingError, "cnf", expected_jkt=other)
    assert err.oauth_error == "invalid_token"


def test_nonce_missing() -> None:
    err = check(build(), UseDPoPNonceError, "nonce", nonce="n-1")
    assert err.oauth_error == "use_dpop_nonce"


@pytest.mark.parametrize("expected", ["n-1", {"n-1", "n-2"}, lambda n: n == "n-1"])
def test_nonce_wrong(expected: Any) -> None:
    check(build(payload=claims(nonce="stale")), UseDPoPNonceError, "nonce", nonce=expected)


def test_nonce_not_a_string() -> None:
    check(build(payload=claims(nonce=5)), InvalidProofError, "nonce", nonce="5")


def test_replay() -> None:
    cache = ReplayCache()
    proof = build()
    verify_proof(proof, htm="GET", htu=HTU, now=NOW, replay_cache=cache)
    err = check(proof, ReplayError, "jti", replay_cache=cache)
    assert err.oauth_error == "invalid_dpop_proof"
    # A different key may use the same jti: the cache key is jkt + jti.
    other = SoftwareSigner.generate("ES256")
    verify_proof(
        build(hdr=header(jwk=dict(other.public_jwk)), signer=other),
        htm="GET", htu=HTU, now=NOW, replay_cache=cache,
    )  # fmt: skip


def test_replay_refused_by_default_without_a_cache_argument() -> None:
    """RFC 9449 §11.1: a verifier that passes no cache still refuses the second use."""
    proof = ProofFactory(SIGNER, clock=lambda: NOW).create("GET", HTU)
    verify_proof(proof, htm="GET", htu=HTU, now=NOW)
    err = check(proof, ReplayError, "jti", replay_cache=None)  # None: the process-wide cache
    assert err.oauth_error == "invalid_dpop_proof"
    with pytest.raises(ReplayError):
        verify_proof(proof, htm="GET", htu=HTU, now=NOW + 1)


def test_default_cache_is_one_bounded_cache_per_process() -> None:
    cache = default_replay_cache()
    assert cache is default_replay_cache()
    proof = ProofFactory(SIGNER, clock=lambda: NOW).create("GET", HTU)
    verify_proof(proof, htm="GET", htu=HTU, now=NOW)
    assert not cache.check_and_store(SIGNER.thumbprint + ":" + _jti(proof), NOW + 60.0, NOW)


def test_no_replay_check_is_the_only_opt_out() -> None:
    proof = ProofFactory(SIGNER, clock=lambda: NOW).create("GET", HTU)
    cache = default_replay_cache()
    before = len(cache)
    for _ in range(3):
        verify_proof(proof, htm="GET", htu=HTU, now=NOW, replay_cache=NO_REPLAY_CHECK)
    assert len(cache) == before  # nothing stored anywhere
    verify_proof(proof, htm="GET", htu=HTU, now=NOW)  # and the default cache still works
    with pytest.raises(ReplayError):
        verify_proof(proof, htm="GET", htu=HTU, now=NOW)


def _jti(proof: str) -> str:
    payload = proof.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"])


def test_replay_allowed_again_after_window() -> None:
    cache = ReplayCache()
    proof = build()
    verify_proof(proof, htm="GET", htu=HTU, now=NOW, replay_cache=cache)
    # Once the proof is too old to pass the iat check, the entry may expire from the cache.
    check(proof, InvalidProofError, "iat", replay_cache=cache, now=NOW + 100)
    assert cache.check_and_store("k", NOW + 200.0, NOW + 100.0)
    assert len(cache) <= 2


def test_unsigned_junk_never_enters_the_replay_cache() -> None:
    cache = ReplayCache()
    check(build(signer=SoftwareSigner.generate("ES256")), InvalidProofError, "signature",
          replay_cache=cache)  # fmt: skip
    assert len(cache) == 0


def test_errors_never_contain_the_proof() -> None:
    proof = build(payload=claims(htm="POST"))
    err = check(proof, InvalidProofError, "htm")
    assert proof not in str(err) and proof.split(".")[2] not in repr(err)


def test_public_key_from_jwk_refuses_non_mapping() -> None:
    with pytest.raises(InvalidProofError):
        public_key_from_jwk([1, 2])  # type: ignore[arg-type]
