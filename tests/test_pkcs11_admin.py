"""Token initialization through the PKCS#11 API, so no PIN ever sits on a command line."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dpop_hsm import load_signer
from dpop_hsm.errors import ConfigurationError, KeyNotFoundError, PinError, TokenNotPresentError
from dpop_hsm.signers.pkcs11 import Pkcs11Signer
from dpop_hsm.signers.pkcs11_admin import init_token, token_labels
from dpop_hsm.signers.pkcs11_module import load_module
from tests.support import children

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.softhsm
def test_init_token_then_generate_and_sign(softhsm: Any) -> None:
    label = "admin-" + secrets.token_hex(3)
    so_pin, user_pin = secrets.token_hex(6), secrets.token_hex(6)
    slot = init_token(softhsm.module, label=label, so_pin=so_pin, user_pin=user_pin)
    assert label in token_labels(softhsm.module)
    # The returned slot holds the token under its new label (SoftHSM2 may move it later).
    module = load_module(softhsm.module)
    assert next(s for s in module.lib.get_slots() if s.slot_id == slot).get_token().label == label
    uri = softhsm.uri(label, object="k")
    with Pkcs11Signer.generate(uri, "ES256", secret=user_pin) as signer:
        assert len(signer.sign(b"x")) == 64
        assert signer.key_protection() == {
            "sensitive": True,
            "always_sensitive": True,
            "extractable": False,
            "never_extractable": True,
            "local": True,
        }
    with pytest.raises(PinError) as wrong:
        load_signer(softhsm.uri(label, object="k"), secret="not-" + user_pin)
    assert user_pin not in str(wrong.value)
    with pytest.raises(ConfigurationError, match="exists already"):
        init_token(softhsm.module, label=label, so_pin=so_pin, user_pin=user_pin)


@pytest.mark.softhsm
def test_reinit_needs_the_so_pin_and_a_wrong_one_leaves_the_token_intact(softhsm: Any) -> None:
    label = "reinit-" + secrets.token_hex(3)
    so_pin, user_pin = secrets.token_hex(6), secrets.token_hex(6)
    slot = init_token(softhsm.module, label=label, so_pin=so_pin, user_pin=user_pin)
    uri = softhsm.uri(label, object="kept")
    with Pkcs11Signer.generate(uri, "ES256", secret=user_pin) as signer:
        thumbprint = signer.thumbprint
    wrong_so = "wrong-" + so_pin
    with pytest.raises(PinError) as info:
        init_token(softhsm.module, label=label, so_pin=wrong_so, user_pin=user_pin, slot_id=slot)
    assert wrong_so not in str(info.value) and user_pin not in str(info.value)
    assert "C_InitToken" not in str(info.value)  # mapped, not a raw failure
    with Pkcs11Signer(uri, secret=user_pin) as again:  # still there, same key
        assert again.thumbprint == thumbprint
    # The right SO PIN re-initializes (wipes) the token; a new user PIN works, the key is gone.
    new_pin = secrets.token_hex(6)
    init_token(softhsm.module, label=label, so_pin=so_pin, user_pin=new_pin, slot_id=slot)
    with pytest.raises(KeyNotFoundError):
        Pkcs11Signer(uri, secret=new_pin)
    with pytest.raises(PinError):
        Pkcs11Signer(uri, secret=user_pin)


@pytest.mark.softhsm
def test_explicit_slot_must_exist(softhsm: Any) -> None:
    with pytest.raises(TokenNotPresentError, match="no token in slot"):
        init_token(softhsm.module, label="x", so_pin="12345678", user_pin="12345678", slot_id=9**9)


@pytest.mark.softhsm
def test_short_user_pin_is_a_pin_error_after_init(softhsm: Any) -> None:
    # SoftHSM2 wants at least 4 characters: C_InitPIN answers CKR_PIN_LEN_RANGE.
    label = "short-" + secrets.token_hex(3)
    with pytest.raises(PinError, match="was initialized but setting its user PIN failed"):
        init_token(softhsm.module, label=label, so_pin=secrets.token_hex(6), user_pin="1")


@pytest.mark.softhsm
def test_label_must_fit_the_token_info(softhsm: Any) -> None:
    with pytest.raises(ConfigurationError, match="1 to 32 bytes"):
        init_token(softhsm.module, label="x" * 33, so_pin="123456", user_pin="123456")


@pytest.mark.softhsm
def test_setup_script_is_idempotent_and_keeps_pins_off_argv(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "softhsm-setup"
    source = script.read_text(encoding="utf-8")
    assert "--pin" not in source and "--so-pin" not in source
    env = {k: v for k, v in os.environ.items() if k not in ("DPOP_HSM_PIN", "SOFTHSM2_CONF")}
    env["PYTHON"] = sys.executable
    runs = [
        subprocess.run(
            ["bash", str(script), str(tmp_path / "t")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        for _ in range(2)
    ]
    first, second = runs
    assert first.stdout.startswith("pkcs11:token=dpop;object=dpop-demo")
    assert first.stdout == second.stdout  # same key, found again
    assert "initialized" in first.stderr and "reusing it" in second.stderr
    pin = (tmp_path / "t" / "pin").read_text(encoding="utf-8").strip()
    assert (tmp_path / "t" / "pin").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "t" / "so-pin").stat().st_mode & 0o777 == 0o600
    assert pin not in first.stdout + first.stderr + second.stdout + second.stderr


@pytest.mark.tpm
def test_init_token_on_tpm2_pkcs11(tpm2_pkcs11: Any) -> None:
    # A second, very different module: tpm2-pkcs11 offers one uninitialized token per store
    # (after "tpm2_ptool init") and creates the token's TPM objects at C_InitToken.
    label = "admin-" + secrets.token_hex(3)
    job = {
        "module": str(tpm2_pkcs11.module),
        "label": label,
        "so_pin": secrets.token_hex(6),
        "user_pin": secrets.token_hex(6),
    }
    done = subprocess.run(
        children.command("tpm2_pkcs11_admin"),
        input=json.dumps(job),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert label in result["labels"] and tpm2_pkcs11.token in result["labels"]
    assert result["verified"] is True
    assert result["wrong_pin"] == "PinError"
