"""SoftwareSigner: every alg, every key file format, password sources, and a typed error that
names the problem (never the secret) for every bad key."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x25519

from dpop_hsm.errors import (
    ConfigurationError,
    KeyReferenceError,
    SecretSourceError,
    UnsupportedKeyError,
)
from dpop_hsm.jose import b64url_encode
from dpop_hsm.proof import ProofFactory
from dpop_hsm.secret_sources import read_secret_source
from dpop_hsm.signers.base import Signer
from dpop_hsm.signers.software import SoftwareSigner, public_jwk_of
from dpop_hsm.verify import verify_proof

PASSWORD = "correct-horse-battery-staple"
SIZES = {"ES256": 64, "ES384": 96, "ES512": 132, "EdDSA": 64, "PS256": 256, "RS256": 256}
PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER
PKCS8 = serialization.PrivateFormat.PKCS8
TRAD = serialization.PrivateFormat.TraditionalOpenSSL  # SEC1 for EC, PKCS#1 for RSA
PLAIN = serialization.NoEncryption()


def _works(signer: SoftwareSigner, alg: str) -> None:
    assert isinstance(signer, Signer)
    assert signer.alg == alg
    proof = ProofFactory(signer).create("POST", "https://as.example/token")
    result = verify_proof(proof, htm="POST", htu="https://as.example/token")
    assert result.jkt == signer.thumbprint
    assert len(signer.sign(b"data")) == SIZES[alg]


@pytest.fixture(scope="module")
def keys() -> dict[str, object]:
    return {
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "ES384": ec.generate_private_key(ec.SECP384R1()),
        "ES512": ec.generate_private_key(ec.SECP521R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
        "RSA": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


@pytest.mark.parametrize("alg", list(SIZES))
def test_generate_every_alg(alg: str) -> None:
    signer = SoftwareSigner.generate(alg)
    _works(signer, alg)
    assert "d" not in signer.public_jwk
    assert repr(signer) == f"SoftwareSigner(alg={alg!r}, jkt={signer.thumbprint!r})"


def test_default_alg_is_es256() -> None:
    assert SoftwareSigner.generate().alg == "ES256"


@pytest.mark.parametrize("alg", ["HS256", "none", "ES256K", "RS512", ""])
def test_generate_unknown_alg(alg: str) -> None:
    with pytest.raises(UnsupportedKeyError):
        SoftwareSigner.generate(alg)


@pytest.mark.parametrize(
    ("name", "encoding", "fmt", "alg"),
    [
        ("ES256", PEM, PKCS8, "ES256"),
        ("ES256", PEM, TRAD, "ES256"),  # SEC1 "EC PRIVATE KEY"
        ("ES384", PEM, TRAD, "ES384"),
        ("ES512", DER, PKCS8, "ES512"),
        ("ES256", DER, TRAD, "ES256"),
        ("EdDSA", PEM, PKCS8, "EdDSA"),
        ("EdDSA", DER, PKCS8, "EdDSA"),
        ("RSA", PEM, PKCS8, "PS256"),  # RSA defaults to PS256
        ("RSA", PEM, TRAD, "PS256"),  # PKCS#1 "RSA PRIVATE KEY"
        ("RSA", DER, TRAD, "PS256"),
    ],
)
def test_key_files(
    tmp_path: Path,
    keys: dict[str, object],
    name: str,
    encoding: serialization.Encoding,
    fmt: serialization.PrivateFormat,
    alg: str,
) -> None:
    key = keys[name]
    path = tmp_path / "key"
    path.write_bytes(key.private_bytes(encoding, fmt, PLAIN))  # type: ignore[attr-defined]
    signer = SoftwareSigner.from_file(path)
    _works(signer, alg)
    assert signer.public_jwk == public_jwk_of(key.public_key())  # type: ignore[attr-defined]


def test_rsa_alg_choice(tmp_path: Path, keys: dict[str, object]) -> None:
    path = tmp_path / "rsa.pem"
    path.write_bytes(keys["RSA"].private_bytes(PEM, PKCS8, PLAIN))  # type: ignore[attr-defined]
    _works(SoftwareSigner.from_file(path, alg="RS256"), "RS256")


def _private_jwk(key: object) -> dict[str, str]:
    def enc(value: int, size: int | None = None) -> str:
        size = size or (value.bit_length() + 7) // 8
        return b64url_encode(value.to_bytes(size, "big"))

    if isinstance(key, ec.EllipticCurvePrivateKey):
        size = (key.curve.key_size + 7) // 8
        return {
            **public_jwk_of(key.public_key()),
            "d": enc(key.private_numbers().private_value, size),
        }
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, PLAIN)
        return {**public_jwk_of(key.public_key()), "d": b64url_encode(raw)}
    assert isinstance(key, rsa.RSAPrivateKey)
    n = key.private_numbers()
    return {**public_jwk_of(key.public_key()), "d": enc(n.d), "p": enc(n.p), "q": enc(n.q),
            "dp": enc(n.dmp1), "dq": enc(n.dmq1), "qi": enc(n.iqmp)}  # fmt: skip


JWK_CASES = [("ES256", "ES256"), ("ES384", "ES384"), ("ES512", "ES512"), ("EdDSA", "EdDSA"),
             ("RSA", "PS256")]  # fmt: skip


@pytest.mark.parametrize(("name", "alg"), JWK_CASES)
def test_jwk_files(tmp_path: Path, keys: dict[str, object], name: str, alg: str) -> None:
    path = tmp_path / "key.jwk"
    path.write_text(json.dumps(_private_jwk(keys[name])))
    signer = SoftwareSigner.from_file(path)
    _works(signer, alg)
    assert signer.public_jwk == public_jwk_of(keys[name].public_key())  # type: ignore[attr-defined]


def test_jwk_alg_member_is_used(keys: dict[str, object]) -> None:
    signer = SoftwareSigner.from_jwk({**_private_jwk(keys["RSA"]), "alg": "RS256"})
    assert signer.alg == "RS256"


# --- encrypted keys and password sources ----------------------------------------------------


@pytest.fixture
def encrypted(tmp_path: Path, keys: dict[str, object]) -> Path:
    path = tmp_path / "enc.pem"
    pem = keys["ES256"].private_bytes(  # type: ignore[attr-defined]
        PEM, PKCS8, serialization.BestAvailableEncryption(PASSWORD.encode())
    )
    path.write_bytes(pem)
    return path


def test_encrypted_pem_password_callback(encrypted: Path) -> None:
    calls = []

    def prompt() -> str:
        calls.append(1)
        return PASSWORD

    _works(SoftwareSigner.from_file(encrypted, password=prompt), "ES256")
    assert calls == [1]
    _works(SoftwareSigner.from_file(encrypted, password=lambda: PASSWORD.encode()), "ES256")
    _works(SoftwareSigner.from_file(encrypted, password=PASSWORD), "ES256")


def test_encrypted_pem_password_from_env(encrypted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPOP_TEST_KEY_PASSWORD", PASSWORD)
    password = read_secret_source("env:DPOP_TEST_KEY_PASSWORD", what="key password")
    _works(SoftwareSigner.from_file(encrypted, password=password), "ES256")


def test_encrypted_pem_password_from_file(encrypted: Path, tmp_path: Path) -> None:
    secret_file = tmp_path / "pw.txt"
    secret_file.write_text(PASSWORD + "\n")
    for spec in (f"file:{secret_file}", f"file://{secret_file}"):
        password = read_secret_source(spec, what="key password")
        _works(SoftwareSigner.from_file(encrypted, password=password), "ES256")


def test_traditional_encrypted_pem(tmp_path: Path, keys: dict[str, object]) -> None:
    path = tmp_path / "ec-enc.pem"
    path.write_bytes(keys["ES384"].private_bytes(  # type: ignore[attr-defined]
        PEM, TRAD, serialization.BestAvailableEncryption(PASSWORD.encode())))  # fmt: skip
    _works(SoftwareSigner.from_file(path, password=PASSWORD), "ES384")


def test_wrong_password(encrypted: Path) -> None:
    with pytest.raises(SecretSourceError) as info:
        SoftwareSigner.from_file(encrypted, password="wrong-password-XYZ")
    assert "wrong-password-XYZ" not in str(info.value) + repr(info.value)
    assert "password" in str(info.value)


def test_missing_password(encrypted: Path) -> None:
    with pytest.raises(SecretSourceError) as info:
        SoftwareSigner.from_file(encrypted)
    assert "encrypted" in str(info.value)


def test_password_for_a_plain_key(tmp_path: Path, keys: dict[str, object]) -> None:
    path = tmp_path / "plain.pem"
    path.write_bytes(keys["ES256"].private_bytes(PEM, PKCS8, PLAIN))  # type: ignore[attr-defined]
    with pytest.raises(KeyReferenceError) as info:
        SoftwareSigner.from_file(path, password="unneeded-secret")
    assert "unneeded-secret" not in str(info.value)


def test_failing_password_callback(encrypted: Path) -> None:
    def boom() -> str:
        raise RuntimeError("callback-secret-detail")

    with pytest.raises(SecretSourceError) as info:
        SoftwareSigner.from_file(encrypted, password=boom)
    assert "callback-secret-detail" not in str(info.value)


def test_missing_secret_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DPOP_TEST_UNSET", raising=False)
    with pytest.raises(SecretSourceError):
        read_secret_source("env:DPOP_TEST_UNSET", what="key password")
    with pytest.raises(SecretSourceError):
        read_secret_source(f"file:{tmp_path / 'absent'}", what="key password")
    with pytest.raises(SecretSourceError):
        read_secret_source("file://remote.example/etc/pw", what="key password")
    with pytest.raises(SecretSourceError):
        read_secret_source("literal-secret", what="key password")


# --- key files that are not plain files ----------------------------------------------------


def test_endless_device_as_key_file_is_refused() -> None:
    # stat() says 0 bytes for /dev/zero; read_bytes() then read until memory ran out.
    with pytest.raises(KeyReferenceError, match="larger than 1 MiB"):
        SoftwareSigner.from_file("/dev/zero")


def test_directory_as_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyReferenceError, match="is a directory"):
        SoftwareSigner.from_file(tmp_path)


def test_key_from_a_pipe(keys: dict[str, object]) -> None:
    # --key /dev/fd/N: a key a secret manager pipes in, never written to disk.
    pem = keys["ES256"].private_bytes(PEM, PKCS8, PLAIN)  # type: ignore[attr-defined]
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(write_end, "wb") as f:
            f.write(pem)  # a few hundred bytes: fits in the pipe buffer
        _works(SoftwareSigner.from_file(f"/dev/fd/{read_end}"), "ES256")
    finally:
        os.close(read_end)


@pytest.mark.parametrize(("mode", "warned"), [(0o600, False), (0o400, False), (0o644, True)])
def test_key_file_others_can_read_is_used_with_a_warning(
    tmp_path: Path,
    keys: dict[str, object],
    caplog: pytest.LogCaptureFixture,
    mode: int,
    warned: bool,
) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(keys["ES256"].private_bytes(PEM, PKCS8, PLAIN))  # type: ignore[attr-defined]
    os.chmod(path, mode)
    with caplog.at_level(logging.WARNING, logger="dpop_hsm"):
        _works(SoftwareSigner.from_file(path), "ES256")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert bool(warnings) == warned
    assert all("chmod 600" in w and str(path) in w for w in warnings)


# --- typed errors for bad keys ---------------------------------------------------------------


def test_public_only_pem(tmp_path: Path, keys: dict[str, object]) -> None:
    path = tmp_path / "pub.pem"
    path.write_bytes(keys["ES256"].public_key().public_bytes(  # type: ignore[attr-defined]
        PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    with pytest.raises(UnsupportedKeyError, match="public key only"):
        SoftwareSigner.from_file(path)


@pytest.mark.parametrize("name", ["ES256", "RSA", "EdDSA"])
def test_public_only_der(tmp_path: Path, keys: dict[str, object], name: str) -> None:
    path = tmp_path / "pub.der"
    path.write_bytes(keys[name].public_key().public_bytes(  # type: ignore[attr-defined]
        DER, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    with pytest.raises(UnsupportedKeyError, match="public key only"):
        SoftwareSigner.from_file(path)


def test_public_only_jwk(tmp_path: Path, keys: dict[str, object]) -> None:
    path = tmp_path / "pub.jwk"
    path.write_text(json.dumps(public_jwk_of(keys["ES256"].public_key())))  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedKeyError, match="public key only"):
        SoftwareSigner.from_file(path)


def test_symmetric_oct_jwk(tmp_path: Path) -> None:
    path = tmp_path / "oct.jwk"
    path.write_text(json.dumps({"kty": "oct", "k": "c3ltbWV0cmljLXNlY3JldA"}))
    with pytest.raises(UnsupportedKeyError, match="symmetric") as info:
        SoftwareSigner.from_file(path)
    assert "c3ltbWV0cmljLXNlY3JldA" not in str(info.value)


@pytest.mark.parametrize("curve", [ec.SECP256K1, ec.SECP192R1, ec.SECP224R1, ec.BrainpoolP256R1])
def test_unsupported_curve_pem(tmp_path: Path, curve: type[ec.EllipticCurve]) -> None:
    try:
        key = ec.generate_private_key(curve())
    except Exception:
        pytest.skip(f"OpenSSL here cannot generate {curve.name}")
    path = tmp_path / "k.pem"
    path.write_bytes(key.private_bytes(PEM, PKCS8, PLAIN))
    with pytest.raises(UnsupportedKeyError, match="curve"):
        SoftwareSigner.from_file(path)
    with pytest.raises(UnsupportedKeyError):
        SoftwareSigner(key)


def test_unsupported_curve_jwk() -> None:
    with pytest.raises(UnsupportedKeyError, match="curve"):
        SoftwareSigner.from_jwk({"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA", "d": "AA"})
    with pytest.raises(UnsupportedKeyError):
        SoftwareSigner.from_jwk({"kty": "OKP", "crv": "Ed448", "x": "AA", "d": "AA"})


@pytest.mark.parametrize(
    "factory",
    [
        lambda: ed448.Ed448PrivateKey.generate(),
        lambda: x25519.X25519PrivateKey.generate(),
        lambda: dsa.generate_private_key(key_size=2048),
    ],
)
def test_unsupported_key_types(tmp_path: Path, factory: object) -> None:
    key = factory()  # type: ignore[operator]
    path = tmp_path / "k.pem"
    path.write_bytes(key.private_bytes(PEM, PKCS8, PLAIN))
    with pytest.raises(UnsupportedKeyError):
        SoftwareSigner.from_file(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage bytes \x00\x01\x02",
        b"-----BEGIN PRIVATE KEY-----\nnot base64!!\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN PRIVATE KEY-----\nMIIBVgIBADANBgkqhkiG9w0BAQEFAASCAUAwggE8AgEAAkEA\n"
        b"-----END PRIVATE KEY-----\n",  # truncated
        b'{"kty": "EC", "crv": "P-256", "x": ',
        b'{"kty": "EC", "crv": "P-256", "d": "AAAA"}',
        b'{"kty": "RSA", "n": "AQAB", "e": "AQAB", "d": "AQAB"}',
        b"[1, 2]",
    ],
)
def test_corrupt_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "corrupt"
    path.write_bytes(content)
    with pytest.raises(ConfigurationError):
        SoftwareSigner.from_file(path)


def test_certificate_is_not_a_key(tmp_path: Path) -> None:
    path = tmp_path / "cert.pem"
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(UnsupportedKeyError):
        SoftwareSigner.from_file(path)


def test_missing_and_oversized_files(tmp_path: Path) -> None:
    with pytest.raises(KeyReferenceError):
        SoftwareSigner.from_file(tmp_path / "absent.pem")
    big = tmp_path / "big.pem"
    big.write_bytes(b"0" * ((1 << 20) + 1))
    with pytest.raises(KeyReferenceError):
        SoftwareSigner.from_file(big)


def test_rsa_below_2048_bits(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(UnsupportedKeyError, match="2048"):
        SoftwareSigner(key)
    path = tmp_path / "small.pem"
    path.write_bytes(key.private_bytes(PEM, TRAD, PLAIN))
    with pytest.raises(UnsupportedKeyError, match="2048"):
        SoftwareSigner.from_file(path, alg="RS256")
    with pytest.raises(UnsupportedKeyError, match="2048"):
        SoftwareSigner.from_jwk(_private_jwk(key))


@pytest.mark.parametrize(
    ("name", "alg"),
    [("ES256", "ES384"), ("ES384", "ES256"), ("ES512", "ES256"), ("ES256", "EdDSA"),
     ("ES256", "RS256"), ("EdDSA", "ES256"), ("RSA", "ES256"), ("RSA", "EdDSA"),
     ("ES256", "HS256")],
)  # fmt: skip
def test_alg_key_mismatch(keys: dict[str, object], name: str, alg: str) -> None:
    with pytest.raises(UnsupportedKeyError):
        SoftwareSigner(keys[name], alg=alg)  # type: ignore[arg-type]


def test_not_a_key_object() -> None:
    with pytest.raises(UnsupportedKeyError):
        SoftwareSigner("not a key")  # type: ignore[arg-type]


def test_no_secret_in_errors_or_repr(tmp_path: Path, keys: dict[str, object]) -> None:
    jwk = _private_jwk(keys["ES256"])
    signer = SoftwareSigner.from_jwk(jwk)
    assert jwk["d"] not in repr(signer) and jwk["d"] not in str(dict(signer.public_jwk))
    bad = {**jwk, "x": jwk["y"]}  # d no longer matches the public point
    with pytest.raises(ConfigurationError) as info:
        SoftwareSigner.from_jwk(bad)
    assert jwk["d"] not in str(info.value) + repr(info.value)
    okp = _private_jwk(keys["EdDSA"])
    with pytest.raises(ConfigurationError) as info2:
        SoftwareSigner.from_jwk({**okp, "x": jwk["x"]})
    assert okp["d"] not in str(info2.value) + repr(info2.value)


def test_private_pem_round_trip(tmp_path: Path) -> None:
    signer = SoftwareSigner.generate("ES384")
    path = tmp_path / "k.pem"
    path.write_bytes(signer.private_pem(PASSWORD))
    assert SoftwareSigner.from_file(path, password=PASSWORD).thumbprint == signer.thumbprint
