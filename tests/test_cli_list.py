"""``dpop-hsm list`` against the run's SoftHSM2 and swtpm: every reference it prints works as
``--key`` as printed, and no PIN is used unless ``--login`` asks for one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dpop_hsm.cli import EXIT_CODES
from tests.support.cli import json_error, one_json, run_cli
from tests.support.tpm import fresh_handle


def _module(doc: dict[str, Any], path: str) -> dict[str, Any]:
    for module in doc["pkcs11"]["modules"]:
        if Path(module["path"]).resolve() == Path(path).resolve():
            found: dict[str, Any] = module
            return found
    raise AssertionError(f"{path} not listed: {[m['path'] for m in doc['pkcs11']['modules']]}")


def _token(module: dict[str, Any], label: str) -> dict[str, Any]:
    return next(t for t in module["tokens"] if t["label"] == label)


@pytest.fixture(scope="module")
def listed_key(softhsm: Any) -> Iterator[dict[str, str]]:
    """An ES256 key made on token 'spare' for these tests; its label and thumbprint."""
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    uri = softhsm.uri("spare", object="list-key", id=b"\x4c\x01")
    with Pkcs11Signer.generate(uri, "ES256", secret=softhsm.pin) as signer:
        yield {"label": "list-key", "jkt": signer.thumbprint}


@pytest.mark.softhsm
def test_lists_softhsm_keys_without_a_pin(softhsm: Any, listed_key: dict[str, str]) -> None:
    result = run_cli("list", "--module-path", softhsm.module, "--no-tpm", "--json")
    assert result.returncode == 0, result.stderr
    doc = one_json(result)
    assert "tpm" not in doc
    module = _module(doc, softhsm.module)
    assert module["error"] is None and module["manufacturer"] == "SoftHSM"
    assert {"dpop", "fault", "spare"} <= {t["label"] for t in module["tokens"]}
    token = _token(module, "spare")
    assert token["login_required"] is True and token["logged_in"] is False
    key = next(k for k in token["keys"] if k["label"] == listed_key["label"])
    assert key["id"] == "4c01" and key["type"] == "EC"
    assert key["curve"] == "P-256" and key["alg"] == "ES256"
    assert key["objects"] == ["public"]  # the private key is hidden until a login
    # The printed URI selects that key: the thumbprint matches the generated one.
    jkt = run_cli("thumbprint", "--key", key["uri"], env={"DPOP_HSM_PIN": softhsm.pin})
    assert jkt.returncode == 0, jkt.stderr
    assert jkt.stdout.strip() == listed_key["jkt"]
    assert softhsm.pin not in result.stdout + result.stderr


@pytest.mark.softhsm
def test_login_shows_private_keys_for_one_named_token(
    softhsm: Any, listed_key: dict[str, str]
) -> None:
    env = {"DPOP_HSM_PIN": softhsm.pin}
    args = ["list", "--module-path", softhsm.module, "--no-tpm", "--login", "--json"]
    # One PIN for three tokens: refused before any PIN is sent.
    refused = run_cli(*args, env=env)
    assert refused.returncode == EXIT_CODES["usage"]
    assert "--token" in json_error(refused)["message"]

    result = run_cli(*args, "--token", "spare", env=env)
    assert result.returncode == 0, result.stderr
    module = _module(one_json(result), softhsm.module)
    assert [t["label"] for t in module["tokens"]] == ["spare"]
    token = module["tokens"][0]
    assert token["logged_in"] is True
    key = next(k for k in token["keys"] if k["label"] == listed_key["label"])
    assert key["objects"] == ["private", "public"]
    assert ";type=private" in key["uri"]
    jkt = run_cli("thumbprint", "--key", key["uri"], env=env)
    assert jkt.stdout.strip() == listed_key["jkt"]


@pytest.mark.softhsm
def test_wrong_pin_is_reported_in_the_token_entry(
    softhsm: Any, listed_key: dict[str, str], tmp_path: Path
) -> None:
    wrong = tmp_path / "pin"
    wrong.write_text("wrong-pin-31337\n")
    result = run_cli(
        "list",
        "--module-path",
        softhsm.module,
        "--no-tpm",
        "--token",
        "spare",
        "--login",
        "--pin-source",
        f"file:{wrong}",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    token = _module(one_json(result), softhsm.module)["tokens"][0]
    assert token["error"]["code"] == "pin_incorrect" and token["keys"] == []
    assert "wrong-pin-31337" not in result.stdout + result.stderr


@pytest.mark.softhsm
def test_discovery_and_module_name(softhsm: Any, listed_key: dict[str, str]) -> None:
    found = run_cli("list", "--no-tpm", "--json")
    assert found.returncode == 0, found.stderr
    doc = one_json(found)  # other modules may print on their own: never onto stdout
    module = _module(doc, softhsm.module)
    assert module["module_name"] == "softhsm2"
    for other in doc["pkcs11"]["modules"]:
        assert "spy" not in other["path"] and "p11-kit-proxy" not in other["path"]
        if other["error"] is not None:
            assert set(other["error"]) == {"code", "message", "hint"}

    named = run_cli("list", "--module-name", "softhsm2", "--token", "spare", "--no-tpm")
    assert named.returncode == 0, named.stderr
    assert "token 'spare'" in named.stdout
    uri = next(line.strip() for line in named.stdout.splitlines() if "object=list-key" in line)
    assert uri.endswith("?module-name=softhsm2")


def test_missing_module_is_listed_with_an_accurate_hint(tmp_path: Path) -> None:
    result = run_cli("list", "--module-path", str(tmp_path / "nothing.so"), "--no-tpm", "--json")
    assert result.returncode == 0, result.stderr
    (module,) = one_json(result)["pkcs11"]["modules"]
    assert module["error"]["code"] == "token_not_present"
    assert "pcscd" not in module["error"]["hint"]


# --- TPM --------------------------------------------------------------------------------------


@pytest.mark.tpm
def test_lists_tpm_persistent_keys_with_their_reference(swtpm: Any) -> None:
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2B_PUBLIC, TPMA_OBJECT

    from dpop_hsm.signers.tpm import TpmSigner

    handle = fresh_handle()
    with TpmSigner.generate(tcti=swtpm.tcti, handle=handle) as signer:
        jkt = signer.thumbprint
    storage = fresh_handle()  # a restricted decryption key: listed, but not for signing
    esapi = ESAPI(swtpm.tcti)
    try:
        attrs = TPMA_OBJECT.DEFAULT_TPM2_TOOLS_CREATEPRIMARY_ATTRS  # restricted, decrypt
        template = TPM2B_PUBLIC.parse("ecc256:aes128cfb", objectAttributes=attrs)
        primary, *_ = esapi.create_primary(None, template)
        esapi.evict_control(ESYS_TR.OWNER, primary, storage)
        esapi.flush_context(primary)
    finally:
        esapi.close()
    try:
        result = run_cli("list", "--no-pkcs11", "--tcti", swtpm.tcti, "--json")
        assert result.returncode == 0, result.stderr
        (tpm,) = one_json(result)["tpm"]
        assert tpm["tcti"] == swtpm.tcti and tpm["error"] is None
        by_handle = {h["handle"]: h for h in tpm["handles"]}
        key = by_handle[f"{handle:#010x}"]
        assert key["usable"] is True and key["alg"] == "ES256" and key["jkt"] == jkt
        assert key["ref"] == f"tpm2:handle={handle:#010x};tcti={swtpm.tcti}"
        printed = run_cli("thumbprint", "--key", key["ref"])
        assert printed.stdout.strip() == jkt
        other = by_handle[f"{storage:#010x}"]
        assert other["usable"] is False and other["restricted"] is True
        assert "signing" in other["reason"]

        text = run_cli("list", "--no-pkcs11", "--tcti", swtpm.tcti)
        assert f"    tpm2:handle={handle:#010x};tcti={swtpm.tcti}" in text.stdout.splitlines()
    finally:
        TpmSigner.evict(handle, tcti=swtpm.tcti)
        TpmSigner.evict(storage, tcti=swtpm.tcti)


def test_tpm_that_does_not_answer_is_an_entry_not_a_crash() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    tcti = f"swtpm:host=127.0.0.1,port={port}"
    result = run_cli("list", "--no-pkcs11", "--tcti", tcti, "--json")
    assert result.returncode == 0, result.stderr
    (tpm,) = one_json(result)["tpm"]
    if tpm["error"]["code"] == "missing_dependency":
        pytest.skip("tpm2-pytss is not installed")
    assert tpm["error"]["code"] == "token_not_present"
    assert "pcscd" not in tpm["error"]["hint"] and "TCTI" in tpm["error"]["hint"]
