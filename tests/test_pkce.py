"""PKCE (RFC 7636): S256 only, 43-128 unreserved characters, a fresh verifier per login."""

from __future__ import annotations

import pytest

from dpop_hsm.errors import ConfigurationError, PkceError
from dpop_hsm.pkce import Pkce, new_pkce, s256_challenge, validate_verifier, verifier_matches

# RFC 7636 Appendix B: the example verifier and its S256 challenge.
RFC_VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
RFC_CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_rfc7636_appendix_b_vector() -> None:
    assert s256_challenge(RFC_VERIFIER) == RFC_CHALLENGE
    assert verifier_matches(RFC_VERIFIER, RFC_CHALLENGE)
    assert not verifier_matches(RFC_VERIFIER[:-1] + "Y", RFC_CHALLENGE)


def test_new_pkce_is_fresh_and_well_formed() -> None:
    seen = {new_pkce().verifier for _ in range(200)}
    assert len(seen) == 200
    for length in (43, 64, 128):
        pkce = new_pkce(length)
        assert len(pkce.verifier) == length
        assert pkce.method == "S256" and pkce.challenge == s256_challenge(pkce.verifier)
        validate_verifier(pkce.verifier)


def test_repr_hides_the_verifier() -> None:
    pkce = new_pkce()
    assert pkce.verifier not in repr(pkce) and pkce.challenge in repr(pkce)


@pytest.mark.parametrize("length", [0, 42, 129, 1000, -1, True, 43.0])
def test_verifier_length_bounds(length: object) -> None:
    with pytest.raises(PkceError):
        new_pkce(length)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "verifier",
    [
        "a" * 42,
        "a" * 129,
        "a" * 42 + "=",  # base64 padding is not unreserved
        "a" * 42 + "+",
        "a" * 42 + "/",
        "a" * 42 + " ",
        "a" * 42 + "%",
        "a" * 42 + "é",  # non-ASCII letters are not ALPHA
        "a" * 42 + "٣",  # nor are non-ASCII digits
        "a" * 42 + "\x00",
        "",
    ],
)
def test_invalid_verifiers_are_refused_without_echo(verifier: str) -> None:
    with pytest.raises(PkceError) as info:
        validate_verifier(verifier)
    assert isinstance(info.value, ConfigurationError)
    if len(verifier) > 10:
        assert verifier not in str(info.value)
    assert not verifier_matches(verifier, RFC_CHALLENGE)


def test_all_unreserved_characters_allowed() -> None:
    verifier = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
    assert validate_verifier(verifier) == verifier


def test_plain_is_never_used() -> None:
    with pytest.raises(PkceError):
        Pkce(verifier=RFC_VERIFIER, challenge=RFC_VERIFIER, method="plain")
    with pytest.raises(PkceError):
        verifier_matches(RFC_VERIFIER, RFC_VERIFIER, "plain")
    with pytest.raises(PkceError):  # a challenge that does not belong to the verifier
        Pkce(verifier=RFC_VERIFIER, challenge=RFC_CHALLENGE[:-1] + "A")


def test_verifier_matches_hostile_challenge() -> None:
    assert not verifier_matches(RFC_VERIFIER, "\udcff" * 43)
    assert not verifier_matches(RFC_VERIFIER, "")
