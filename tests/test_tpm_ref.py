"""``tpm2:`` references: grammar, round trip, TCTI and auth resolution (no TPM needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpop_hsm.errors import KeyReferenceError, SecretSourceError
from dpop_hsm.signers.tpm_ref import (
    AUTH_ENV,
    DEFAULT_TCTI,
    TpmReference,
    default_tcti,
    parse_handle,
    resolve_auth,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [("0x81010001", 0x81010001), ("0X81000000", 0x81000000), (str(0x81FFFFFF), 0x81FFFFFF)],
)
def test_handle_forms(text: str, value: int) -> None:
    assert parse_handle(text) == value
    assert TpmReference.parse(f"tpm2:handle={text}").handle == value


@pytest.mark.parametrize("text", ["0x80FFFFFF", "0x82000000", "0x40000001", "12", "abc", "0x"])
def test_handles_outside_the_persistent_range_are_refused(text: str) -> None:
    with pytest.raises(KeyReferenceError, match="handle"):
        TpmReference.parse(f"tpm2:handle={text}")


def test_blob_tcti_auth_alg_and_round_trip() -> None:
    ref = TpmReference.parse(
        "tpm2:blob=/keys/my%20key%3Bv2.tpm2;tcti=swtpm:host=127.0.0.1,port=2321;"
        "auth-source=env:KEY_AUTH;alg=ES384"
    )
    assert ref.blob == Path("/keys/my key;v2.tpm2")
    assert ref.tcti == "swtpm:host=127.0.0.1,port=2321"
    assert ref.auth_source == "env:KEY_AUTH"
    assert ref.alg == "ES384"
    assert TpmReference.parse(str(ref)) == ref
    assert "%3B" in str(ref)  # a ';' inside a value must not split the reference


def test_tcti_with_escaped_semicolon() -> None:
    ref = TpmReference.parse("tpm2:handle=0x81000001;tcti=cmd:tpm2-sim%3Bx")
    assert ref.tcti == "cmd:tpm2-sim;x"
    assert TpmReference.parse(str(ref)) == ref


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("tpm2:", "empty"),
        ("tpm2:tcti=device:/dev/tpmrm0", "exactly one of"),
        ("tpm2:handle=0x81000001;blob=k.tpm2", "exactly one of"),
        ("tpm2:handle=0x81000001;handle=0x81000002", "twice"),
        ("tpm2:handle=0x81000001;colour=blue", "unknown"),
        ("tpm2:handle", "no '=value'"),
        ("tpm2:blob=", "empty"),
        ("tpm2:blob=a%zzb", "bad %-escape"),
        ("tpm2:handle=0x81000001;alg=ES512", "not supported"),
        ("tpm2:handle=0x81000001;auth-source=literal", "auth-source"),
        ("pkcs11:token=x", "not a tpm2"),
    ],
)
def test_malformed_references_name_the_problem(ref: str, message: str) -> None:
    with pytest.raises(KeyReferenceError, match=message):
        TpmReference.parse(ref)


def test_tcti_resolution_order() -> None:
    assert default_tcti({}) == DEFAULT_TCTI
    assert default_tcti({"TSS2_TCTI": "mssim:port=1"}) == "mssim:port=1"
    env = {"TSS2_TCTI": "c", "TCTI": "b", "TPM2TOOLS_TCTI": "a"}
    assert default_tcti(env) == "a"
    assert default_tcti({"TPM2TOOLS_TCTI": "  ", "TCTI": "b"}) == "b"


def test_reference_tcti_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TPM2TOOLS_TCTI", "swtpm:port=1")
    assert TpmReference.parse("tpm2:handle=0x81000001").resolved_tcti() == "swtpm:port=1"
    ref = TpmReference.parse("tpm2:handle=0x81000001;tcti=device:/dev/tpm0")
    assert ref.resolved_tcti() == "device:/dev/tpm0"


def test_auth_resolution_order(tmp_path: Path) -> None:
    secret_file = tmp_path / "auth"
    secret_file.write_text("from-file\n", encoding="utf-8")
    env = {AUTH_ENV: "from-env", "DPOP_HSM_PIN": "a-pkcs11-pin"}
    source = f"file:{secret_file}"
    assert resolve_auth("explicit", source, what="k", environ=env) == "explicit"
    assert resolve_auth(None, source, what="k", environ=env) == "from-file"
    assert resolve_auth(None, None, what="k", environ=env) == "from-env"
    # DPOP_HSM_PIN is never offered to a TPM key (dictionary-attack lockout).
    assert resolve_auth(None, None, what="k", environ={"DPOP_HSM_PIN": "x"}) is None
    with pytest.raises(SecretSourceError, match="NOT_SET") as missing:
        resolve_auth(None, "env:NOT_SET", what="k", environ={})
    assert "from-" not in str(missing.value)


def test_describe_key_holds_no_secret() -> None:
    ref = TpmReference.parse("tpm2:handle=0x81000001;auth-source=env:KEY_AUTH")
    assert ref.describe_key() == "persistent handle 0x81000001"
