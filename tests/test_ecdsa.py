"""ecdsa.py: strict DER <-> raw r||s <-> (r, s), checked against RFC 6979 §A.2.5 and a test-local
DER encoder (so a bug in ``cryptography``'s encoder and ours cannot cancel out)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from dpop_hsm.ecdsa import CURVE_ORDERS, der_to_raw, raw_to_der, rs_to_raw
from dpop_hsm.errors import SignatureEncodingError
from tests.support.verifier import der_sig

VECTORS = Path(__file__).parent / "vectors"
SIZES = {"P-256": 32, "P-384": 48, "P-521": 66}
CURVES: dict[str, Callable[[], ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
}
HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "P-256": hashes.SHA256,
    "P-384": hashes.SHA384,
    "P-521": hashes.SHA512,
}


# --- RFC 6979 §A.2.5 -------------------------------------------------------------------------


def _rfc6979() -> dict[str, object]:
    data: dict[str, object] = json.loads((VECTORS / "rfc6979.json").read_text(encoding="utf-8"))
    return data


@pytest.mark.parametrize("index", [0, 1])
def test_rfc6979_round_trips(index: int) -> None:
    vector = _rfc6979()
    sig = vector["signatures"][index]  # type: ignore[index]
    r, s = int(sig["r"], 16), int(sig["s"], 16)
    raw = rs_to_raw(r, s, 32)
    assert raw == bytes.fromhex(sig["r"] + sig["s"])
    assert len(raw) == 64
    der = raw_to_der(raw)
    assert der == der_sig(r, s)
    assert der_to_raw(der, 32) == raw


@pytest.mark.parametrize("index", [0, 1])
def test_rfc6979_deterministic_signature_verifies_and_converts(index: int) -> None:
    vector = _rfc6979()
    sig = vector["signatures"][index]  # type: ignore[index]
    key = ec.derive_private_key(int(vector["private_key_x"], 16), ec.SECP256R1())  # type: ignore[call-overload]
    numbers = key.public_key().public_numbers()
    assert (numbers.x, numbers.y) == (int(vector["public_Ux"], 16), int(vector["public_Uy"], 16))  # type: ignore[call-overload]
    raw = bytes.fromhex(sig["r"] + sig["s"])
    # The RFC's signature verifies through our conversion ...
    key.public_key().verify(raw_to_der(raw), sig["message"].encode(), ec.ECDSA(hashes.SHA256()))
    # ... and, where cryptography offers RFC 6979 signing, it reproduces the RFC's bytes.
    try:
        algorithm = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
    except TypeError:  # cryptography < 44
        return
    assert der_to_raw(key.sign(sig["message"].encode(), algorithm), 32) == raw


# --- left-padding: every curve ---------------------------------------------------------------


@pytest.mark.parametrize("size", sorted(CURVE_ORDERS))
def test_small_integers_are_left_padded(size: int) -> None:
    n = CURVE_ORDERS[size]
    for r, s in [(1, 1), (1, n - 1), (n - 1, 1), (0xFF, 1 << (8 * (size - 2)))]:
        raw = rs_to_raw(r, s, size)
        assert len(raw) == 2 * size
        assert int.from_bytes(raw[:size], "big") == r
        assert int.from_bytes(raw[size:], "big") == s
        der = raw_to_der(raw)
        assert der == der_sig(r, s)
        assert der_to_raw(der, size) == raw


@pytest.mark.parametrize("crv", sorted(SIZES))
def test_real_signatures_with_short_r_or_s_are_padded(crv: str) -> None:
    """Sign until r or s has a leading zero byte (p ≈ 1/128 per signature on P-256/P-384, about
    1/2 on P-521), so the one-in-256 padding bug is exercised on every curve."""
    size = SIZES[crv]
    key = ec.generate_private_key(CURVES[crv]())
    algorithm = ec.ECDSA(HASHES[crv]())
    limit = 1 << (8 * (size - 1))
    for attempt in range(5000):
        message = attempt.to_bytes(4, "big")
        der = key.sign(message, algorithm)
        raw = der_to_raw(der, size)
        r, s = int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big")
        if r < limit or s < limit:
            assert len(raw) == 2 * size
            assert raw[0] == 0 or raw[size] == 0
            assert raw_to_der(raw) == der
            key.public_key().verify(raw_to_der(raw), message, algorithm)
            return
    pytest.fail(f"no short r/s in 5000 {crv} signatures")  # p < 1e-17


@given(data=st.data(), size=st.sampled_from(sorted(CURVE_ORDERS)))
def test_round_trip_property(data: st.DataObject, size: int) -> None:
    n = CURVE_ORDERS[size]
    r = data.draw(st.integers(1, n - 1))
    s = data.draw(st.integers(1, n - 1))
    raw = rs_to_raw(r, s, size)
    assert len(raw) == 2 * size
    assert raw_to_der(raw) == der_sig(r, s)
    assert der_to_raw(der_sig(r, s), size) == raw


# --- strictness ------------------------------------------------------------------------------

GOOD = der_sig(1, 1)


@pytest.mark.parametrize(
    "der",
    [
        GOOD + b"\x00",  # trailing byte
        GOOD + GOOD,
        b"",
        b"\x30",
        b"\x30\x00",
        b"\x30\x07" + GOOD[2:],  # SEQUENCE length too long
        b"\x30\x05" + GOOD[2:],  # too short
        b"\x30\x81\x06" + GOOD[2:],  # long-form length for a short body (not DER)
        bytes.fromhex("3007020200010201 01".replace(" ", "")),  # non-minimal r
        bytes.fromhex("30070202ff80020101"),  # non-minimal negative r
        bytes.fromhex("30060201ff020101"),  # negative r
        bytes.fromhex("300602010102 01ff".replace(" ", "")),  # negative s
        bytes.fromhex("30050200020101"),  # zero-length INTEGER
        bytes.fromhex("3009020101020101020101"),  # three INTEGERs
        bytes.fromhex("3003020101"),  # one INTEGER
        bytes.fromhex("3106020101020101"),  # SET, not SEQUENCE
        bytes.fromhex("3006040101020101"),  # OCTET STRING, not INTEGER
        bytes.fromhex("3006020101020301"),  # INTEGER length past the end
    ],
)
def test_der_to_raw_rejects_malformed_der(der: bytes) -> None:
    with pytest.raises(SignatureEncodingError):
        der_to_raw(der, 32)


@pytest.mark.parametrize("size", sorted(CURVE_ORDERS))
def test_out_of_range_r_s_rejected_everywhere(size: int) -> None:
    n = CURVE_ORDERS[size]
    for r, s in [(0, 1), (1, 0), (0, 0), (n, 1), (1, n), (n + 1, 1)]:
        with pytest.raises(SignatureEncodingError):
            rs_to_raw(r, s, size)
        with pytest.raises(SignatureEncodingError):
            der_to_raw(der_sig(r, s), size)
        if r < 1 << (8 * size) and s < 1 << (8 * size):
            with pytest.raises(SignatureEncodingError):
                raw_to_der(r.to_bytes(size, "big") + s.to_bytes(size, "big"))


def test_r_too_large_for_the_declared_curve() -> None:
    # A valid P-384 signature declared as P-256: r, s exceed the P-256 order or its 32 bytes.
    r = CURVE_ORDERS[48] - 1
    with pytest.raises(SignatureEncodingError):
        der_to_raw(der_sig(r, 1), 32)
    with pytest.raises(SignatureEncodingError):
        rs_to_raw(r, 1, 32)


@pytest.mark.parametrize("length", [0, 1, 2, 31, 32, 63, 65, 66, 95, 97, 128, 130, 131, 133, 264])
def test_raw_to_der_rejects_wrong_lengths(length: int) -> None:
    with pytest.raises(SignatureEncodingError):
        raw_to_der(b"\x01" * length)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64, 65, 67])
def test_unknown_curve_sizes_rejected(size: int) -> None:
    with pytest.raises(SignatureEncodingError):
        rs_to_raw(1, 1, size)
    with pytest.raises(SignatureEncodingError):
        der_to_raw(GOOD, size)


def test_der_to_raw_rejects_non_bytes() -> None:
    with pytest.raises(SignatureEncodingError):
        der_to_raw("3006020101020101", 32)  # type: ignore[arg-type]


@pytest.mark.parametrize("crv", sorted(SIZES))
def test_curve_orders_match_cryptography(crv: str) -> None:
    """The hand-typed group orders are exact: OpenSSL accepts n-1 as a private scalar, not n."""
    n = CURVE_ORDERS[SIZES[crv]]
    assert n.bit_length() == {"P-256": 256, "P-384": 384, "P-521": 521}[crv]
    ec.derive_private_key(n - 1, CURVES[crv]())
    with pytest.raises(ValueError):
        ec.derive_private_key(n, CURVES[crv]())
