"""``tpm2:`` references: grammar, round trip, TCTI and auth resolution (no TPM needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from dpop_hsm.errors import KeyReferenceError, SecretSourceError, UntrustedModuleError
from dpop_hsm.signers.tpm_ref import (
    AUTH_ENV,
    DEFAULT_TCTI,
    PERSISTENT_FIRST,
    PERSISTENT_LAST,
    SAFE_TCTIS,
    TCTI_ENVS,
    TpmReference,
    default_tcti,
    parse_handle,
    resolve_auth,
)

ROOT = Path(__file__).resolve().parent.parent


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
        ("tpm2:blob=%FF", "not UTF-8"),  # was a bare UnicodeDecodeError
        ("tpm2:blob=a%2", "bad %-escape"),
        ("tpm2:blob=100%", "bad %-escape"),
        ("tpm2:Handle=0x81000001", "unknown"),  # names are case-sensitive
        ("tpm2:handle=0x81000001;alg=es256", "not supported"),
        ("tpm2:handle=0x81000001;alg=EdDSA", "not supported"),
        ("tpm2:handle=0x81000001;alg=", "empty"),
        ("tpm2:handle=0x81000001;auth-source=env:", "auth-source"),
        ("tpm2:handle=0x81000001;auth-source=file:", "auth-source"),
        ("tpm2:handle=0x81000001;auth-source=pass:1234", "auth-source"),
        ("tpm2:blob=k.pem;tcti=a;tcti=b", "twice"),
        ("tpm2:auth-source=env:X;alg=ES256", "exactly one of"),
        ("tpm2", "not a tpm2"),
        ("tpm2x:handle=0x81000001", "not a tpm2"),
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


@pytest.mark.parametrize(
    "text",
    ["2_164_260_865", "0x8100_0001", "+2164260865", "\uff12\uff11\uff16\uff14\uff12\uff16\uff10"
     "\uff18\uff16\uff15", " 0x81000001", "0x81000001 ", "0x081000001", "-0x81000001", ""],
)  # fmt: skip
def test_handle_grammar_is_ascii_digits_only(text: str) -> None:
    # int() alone would accept "_" separators, a sign and non-ASCII digits.
    with pytest.raises(KeyReferenceError, match="not a number"):
        parse_handle(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [("0x81000000", PERSISTENT_FIRST), ("0x81ffffff", PERSISTENT_LAST), ("2164260864", 0x81000000)],
)
def test_persistent_range_bounds_are_inclusive(text: str, value: int) -> None:
    assert parse_handle(text) == value
    ref = TpmReference.parse(f"tpm2:handle={text}")
    assert str(ref) == f"tpm2:handle={value:#010x}"  # printed canonically, in hex


def test_constructor_validates_like_the_parser() -> None:
    with pytest.raises(KeyReferenceError, match="persistent"):
        TpmReference(handle=0x80000001)
    with pytest.raises(KeyReferenceError, match="exactly one of"):
        TpmReference()
    with pytest.raises(KeyReferenceError, match="tcti"):
        TpmReference(handle=0x81000001, tcti="")  # would print "tcti=", which cannot parse


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ("keys/dpop.tpm2", "keys/dpop.tpm2"),  # relative: to the working directory
        ("/var/lib/dpop/k%2Cv%3D1.pem", "/var/lib/dpop/k,v=1.pem"),
        ("a%25b%3Bc", "a%b;c"),
        ("%C3%A9t%C3%A9.pem", "\u00e9t\u00e9.pem"),
        ("my%20key", "my key"),
    ],
)
def test_blob_paths_are_percent_decoded_and_round_trip(raw: str, path: str) -> None:
    ref = TpmReference.parse(f"tpm2:blob={raw}")
    assert ref.blob == Path(path)
    assert ref.handle is None
    assert TpmReference.parse(str(ref)) == ref
    assert ref.describe_key() == f"key blob {path!r}"


@pytest.mark.parametrize(
    "tcti",
    [
        "swtpm:host=127.0.0.1,port=2321",
        "mssim:host=localhost,port=2321",
        "tabrmd:bus_name=com.intel.tss2.Tabrmd,bus_type=session",
        "device:/dev/tpmrm0",
        "cmd:tpm2_send --tcti=swtpm:port=2321",
        "libtss2-tcti-swtpm.so.0:port=2321",
    ],
)
def test_tcti_values_keep_commas_colons_and_equals(tcti: str) -> None:
    ref = TpmReference.parse(f"tpm2:handle=0x81000001;tcti={quote(tcti, safe=':,=/')}")
    assert ref.tcti == tcti
    assert ref.resolved_tcti(allow_module_path=True) == tcti
    assert TpmReference.parse(str(ref)) == ref
    if tcti.partition(":")[0] in SAFE_TCTIS:
        assert ref.resolved_tcti() == tcti
    else:  # cmd: runs a program, a library name or path loads code: the caller must opt in
        with pytest.raises(UntrustedModuleError, match="allow_module_path"):
            ref.resolved_tcti()


@pytest.mark.parametrize(
    "tcti",
    [
        "cmd:touch /tmp/x",
        "/tmp/evil.so:conf",
        "./libtss2-tcti-x.so",
        "libtpms:state.bin",
        "pcap:device",
        ":port=1",
        "Device:/dev/tpmrm0",
    ],
)
def test_reference_tctis_that_load_code_are_refused(tcti: str) -> None:
    ref = TpmReference(handle=0x81000001, tcti=tcti)
    with pytest.raises(UntrustedModuleError) as info:
        ref.resolved_tcti()
    assert isinstance(info.value, KeyReferenceError)  # the reference is not usable as given
    assert info.value.code == "untrusted_module"


def test_environment_tcti_is_the_operators(monkeypatch: pytest.MonkeyPatch) -> None:
    # $TPM2TOOLS_TCTI is set by whoever runs the process, not by a reference string.
    monkeypatch.setenv("TPM2TOOLS_TCTI", "cmd:tpm2_send")
    assert TpmReference(handle=0x81000001).resolved_tcti() == "cmd:tpm2_send"


_CMD_CHILD = """
import sys
from dpop_hsm import load_signer
from dpop_hsm.errors import UntrustedModuleError, TokenNotPresentError
ref = "tpm2:handle=0x81000001;tcti=cmd:touch " + sys.argv[1]
try:
    load_signer(ref, allow_module_path=sys.argv[2] == "allow")
except UntrustedModuleError:
    print("refused")
except TokenNotPresentError:
    print("ran")
"""


def test_a_reference_cannot_run_a_command(tmp_path: Path) -> None:
    # The hostile input: the cmd TCTI runs its configuration as a command line. Refused before
    # the TSS sees it; with the caller's opt-in the very same reference does run the command
    # (the positive control that proves the refusal is what kept it from running).
    pytest.importorskip("tpm2_pytss", reason="tpm2-pytss (the 'tpm' extra) is not installed")
    marker = tmp_path / "ran-a-command"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TSS2_LOG": "all+NONE"}
    refused = subprocess.run(
        [sys.executable, "-c", _CMD_CHILD, str(marker), "refuse"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert refused.stdout.strip() == "refused"
    assert not marker.exists()
    allowed = subprocess.run(
        [sys.executable, "-c", _CMD_CHILD, str(marker), "allow"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert allowed.stdout.strip() == "ran", allowed.stderr
    assert marker.exists()


def test_unescaped_semicolon_in_a_tcti_splits_the_reference() -> None:
    # The RFC 7512-like grammar splits on ';': an unescaped one starts a new (unknown) attribute.
    with pytest.raises(KeyReferenceError, match="'x'"):
        TpmReference.parse("tpm2:handle=0x81000001;tcti=cmd:a;x")


def test_scheme_is_case_insensitive_and_empty_segments_are_skipped() -> None:
    ref = TpmReference.parse("TPM2:handle=0x81000001;;alg=ES256;")
    assert (ref.handle, ref.alg) == (0x81000001, "ES256")
    assert str(ref) == "tpm2:handle=0x81000001;alg=ES256"


@pytest.mark.parametrize("source", ["env:KEY_AUTH", "file:/run/secrets/k;1", "file:rel/auth"])
def test_auth_source_forms_round_trip(source: str) -> None:
    ref = TpmReference(handle=0x81000001, auth_source=source)
    text = str(ref)
    assert text.count(";") == 1  # a ';' in the path is escaped
    assert TpmReference.parse(text).auth_source == source


def test_full_round_trip_in_canonical_order() -> None:
    ref = TpmReference(blob=Path("k;%.pem"), tcti="cmd:x;y", auth_source="file:/a b", alg="ES384")
    text = str(ref)
    assert text == "tpm2:blob=k%3B%25.pem;tcti=cmd:x%3By;auth-source=file:/a%20b;alg=ES384"
    assert TpmReference.parse(text) == ref
    assert text == ref.to_string()


def test_tcti_resolution_from_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TCTI_ENVS:
        monkeypatch.delenv(name, raising=False)
    ref = TpmReference.parse("tpm2:handle=0x81000001")
    assert ref.resolved_tcti() == default_tcti() == DEFAULT_TCTI == "device:/dev/tpmrm0"
    # Set from lowest to highest priority: each newly set variable must win.
    for name in reversed(TCTI_ENVS):
        monkeypatch.setenv(name, f"swtpm:host={name.lower()}")
        assert ref.resolved_tcti() == f"swtpm:host={name.lower()}"
    assert TCTI_ENVS == ("TPM2TOOLS_TCTI", "TCTI", "TSS2_TCTI")  # tpm2-tools' order
    monkeypatch.setenv("TPM2TOOLS_TCTI", " ")  # blank: skipped, not used as a TCTI
    assert ref.resolved_tcti() == "swtpm:host=tcti"
    # A TCTI in the reference beats every variable.
    assert TpmReference.parse("tpm2:handle=0x81000001;tcti=mssim").resolved_tcti() == "mssim"


def test_auth_env_handling(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(AUTH_ENV, raising=False)
    monkeypatch.setenv("DPOP_HSM_PIN", "pkcs11-pin")
    assert resolve_auth(None, None, what="k") is None  # empty auth, never the PKCS#11 PIN
    monkeypatch.setenv(AUTH_ENV, "env-auth")
    assert resolve_auth(None, None, what="k") == "env-auth"
    monkeypatch.setenv("MY_KEY_AUTH", "named")
    assert resolve_auth(None, "env:MY_KEY_AUTH", what="k") == "named"  # source beats $AUTH_ENV
    assert resolve_auth(lambda: "callback", "env:MY_KEY_AUTH", what="k") == "callback"
    assert resolve_auth(b"bytes-auth", None, what="k") == "bytes-auth"
    monkeypatch.setenv(AUTH_ENV, "")
    assert resolve_auth(None, None, what="k") == ""  # set but empty: empty auth, explicitly
    missing = tmp_path / "absent"
    with pytest.raises(SecretSourceError) as info:
        resolve_auth(None, f"file:{missing}", what="key auth")
    assert "env-auth" not in str(info.value) and "named" not in str(info.value)
