"""Pkcs11Signer on a real SoftHSM2 token: keys, proofs, threads and the faults tokens show.

Signatures are checked with ``cryptography`` (an independent implementation), never with the
token itself. Faults are caused for real: sessions closed under the signer, the token wiped and
re-created, wrong PINs, a real ``fork()``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dpop_hsm import load_signer
from dpop_hsm.errors import (
    AmbiguousKeyError,
    KeyNotFoundError,
    KeyReferenceError,
    PinError,
    SecretSourceError,
    SignerError,
    TokenNotPresentError,
    UnsupportedKeyError,
)
from dpop_hsm.jose import b64url_decode
from dpop_hsm.proof import ProofFactory
from dpop_hsm.verify import verify_proof
from tests.support.hardware import unavailable
from tests.support.softhsm import SoftHsm
from tests.support.verifier import verify_proof_signature, verify_signature

pytestmark = pytest.mark.softhsm

HTU = "https://api.example.com/resource"
YKCS11 = "/usr/lib/x86_64-linux-gnu/libykcs11.so"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def es256(softhsm: SoftHsm) -> Iterator[Any]:
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    with Pkcs11Signer.generate(
        softhsm.uri(object="test-es256"), "ES256", secret=softhsm.pin
    ) as signer:
        yield signer


# --- keys ----------------------------------------------------------------------------------


def test_generated_key_never_leaves_the_token(softhsm: SoftHsm, es256: Any) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    # python-pkcs11 directly, on its own session (the signer's login covers the application).
    lib = pkcs11.lib(softhsm.module)
    token = lib.get_token(token_label="dpop")
    with token.open() as session:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="test-es256")
        assert key[Attribute.TOKEN] is True
        assert key[Attribute.PRIVATE] is True
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.ALWAYS_SENSITIVE] is True
        assert key[Attribute.NEVER_EXTRACTABLE] is True
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.SIGN] is True
        assert key[Attribute.DECRYPT] is False
        assert key[Attribute.DERIVE] is False
        with pytest.raises(pkcs11.exceptions.PKCS11Error):
            key[Attribute.VALUE]


def test_generated_key_attributes_with_pkcs11_tool(softhsm: SoftHsm, es256: Any) -> None:
    tool = shutil.which("pkcs11-tool")
    if tool is None:
        pytest.skip("pkcs11-tool (opensc) not installed: python-pkcs11 check above still ran")
    # "--pin env:NAME" (OpenSC >= 0.22): the PIN is read from the environment, not argv.
    out = subprocess.run(
        [tool, "--module", softhsm.module, "--token-label", "dpop", "--login",
         "--pin", "env:DPOP_HSM_TEST_PIN", "--list-objects", "--type", "privkey"],
        env={**os.environ, "DPOP_HSM_TEST_PIN": softhsm.pin},
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    block = out[out.index("test-es256") :].split("Private Key Object")[0]
    assert "sensitive" in block
    assert "always sensitive" in block
    assert "never extractable" in block
    assert "local" in block


def test_public_jwk_and_uri_round_trip(softhsm: SoftHsm, es256: Any) -> None:
    assert es256.alg == "ES256"
    jwk = dict(es256.public_jwk)
    assert set(jwk) == {"kty", "crv", "x", "y"}
    assert len(b64url_decode(jwk["x"])) == 32 == len(b64url_decode(jwk["y"]))
    assert softhsm.pin not in es256.uri
    assert softhsm.pin not in repr(es256)
    assert es256.uri.startswith("pkcs11:token=dpop;object=test-es256;type=private;id=%")
    again = load_signer(es256.uri, secret=softhsm.pin)
    try:
        assert again.thumbprint == es256.thumbprint
        assert again.public_jwk == es256.public_jwk
    finally:
        again.close()  # type: ignore[attr-defined]
    # A module-name URI stays portable: the signer prints the name, not this machine's path.
    by_name = load_signer(
        "pkcs11:token=dpop;object=test-es256?module-name=softhsm2", secret=softhsm.pin
    )
    try:
        assert by_name.uri.endswith("?module-name=softhsm2")  # type: ignore[attr-defined]
        assert by_name.thumbprint == es256.thumbprint
    finally:
        by_name.close()  # type: ignore[attr-defined]


def test_ten_thousand_es256_proofs_verify(es256: Any) -> None:
    factory = ProofFactory(es256)
    jwk = dict(es256.public_jwk)
    for i in range(10_000):
        proof = factory.create("POST", HTU, access_token=f"token-{i % 7}")
        verify_proof_signature(proof, jwk)
    # and one through the project's verifier, for the claims
    verified = verify_proof(factory.create("GET", HTU), htm="GET", htu=HTU)
    assert verified.jkt == es256.thumbprint


@pytest.mark.parametrize("alg", ["ES384", "ES512", "EdDSA", "PS256", "RS256"])
def test_other_algorithms_sign_valid_proofs(softhsm: SoftHsm, alg: str) -> None:
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    with Pkcs11Signer.generate(
        softhsm.uri(object=f"test-{alg.lower()}"), alg, secret=softhsm.pin
    ) as signer:
        assert signer.alg == alg
        factory = ProofFactory(signer)
        for _ in range(20):
            verified = verify_proof(
                factory.create("GET", HTU), htm="GET", htu=HTU, algorithms=(alg,)
            )
            assert verified.jkt == signer.thumbprint
        if alg in ("ES384", "ES512"):
            sig = b64url_decode(factory.create("GET", HTU).rsplit(".", 1)[1])
            assert len(sig) == {"ES384": 96, "ES512": 132}[alg]


def test_alg_must_fit_the_key(softhsm: SoftHsm, es256: Any) -> None:
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    with pytest.raises(UnsupportedKeyError):
        Pkcs11Signer(es256.uri, secret=softhsm.pin, alg="ES384")


def test_generate_refuses_to_overwrite(softhsm: SoftHsm, es256: Any) -> None:
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    with pytest.raises(KeyReferenceError) as info:
        Pkcs11Signer.generate(softhsm.uri(object="test-es256"), secret=softhsm.pin)
    assert "refusing to overwrite" in str(info.value)


def test_key_selection_is_unambiguous(softhsm: SoftHsm, es256: Any) -> None:
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    # A second key with the same label but another id: by label alone it is ambiguous.
    Pkcs11Signer.generate(softhsm.uri(object="twin", id=b"\x01"), secret=softhsm.pin).close()
    Pkcs11Signer.generate(softhsm.uri(object="twin-b", id=b"\x02"), secret=softhsm.pin).close()
    _relabel(softhsm, b"\x02", "twin")
    with pytest.raises(AmbiguousKeyError) as info:
        Pkcs11Signer(softhsm.uri(object="twin"), secret=softhsm.pin)
    assert "id=01" in str(info.value)
    assert "id=02" in str(info.value)
    with Pkcs11Signer(softhsm.uri(object="twin", id=b"\x02"), secret=softhsm.pin) as one:
        assert one.uri.endswith("id=%02?module-path=" + softhsm.module)
    with pytest.raises(KeyNotFoundError) as nf:
        Pkcs11Signer(softhsm.uri(object="no-such-key"), secret=softhsm.pin)
    assert "test-es256" in str(nf.value)  # candidates are listed
    with pytest.raises(KeyNotFoundError):  # RFC 7512 §2.3: unknown path attribute
        Pkcs11Signer(softhsm.uri().replace("?", ";x-vendor=1?"), secret=softhsm.pin)


def _relabel(softhsm: SoftHsm, key_id: bytes, label: str) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    token = pkcs11.lib(softhsm.module).get_token(token_label="dpop")
    with token.open(rw=True) as session:
        session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=key_id)[Attribute.LABEL] = label


def _generate_pin_per_signature_key(softhsm: SoftHsm, label: str, key_id: bytes) -> None:
    """A P-256 pair with CKA_ALWAYS_AUTHENTICATE, like a YubiKey PIV slot 9c key (a login
    before each signature), which ``Pkcs11Signer.generate`` does not make. The token must be
    logged in already (through the es256 fixture's signer)."""
    import pkcs11
    from asn1crypto import core
    from pkcs11 import Attribute, KeyType, Mechanism

    token = pkcs11.lib(softhsm.module).get_token(token_label="dpop")
    with token.open(rw=True) as session:
        session.generate_keypair(
            KeyType.EC,
            mechanism=Mechanism.EC_KEY_PAIR_GEN,
            store=True,
            label=label,
            id=key_id,
            public_template={
                Attribute.EC_PARAMS: core.ObjectIdentifier("1.2.840.10045.3.1.7").dump()
            },
            private_template={Attribute.ALWAYS_AUTHENTICATE: True, Attribute.SIGN: True},
        )


# --- threads -------------------------------------------------------------------------------

_STRESS = textwrap.dedent(
    """
    import json, sys, threading, time
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer
    from tests.support.verifier import signature_verifier

    uri, pin, seconds, threads = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    signer = Pkcs11Signer(uri, secret=pin, max_sessions=threads)
    verify = signature_verifier(dict(signer.public_jwk))
    counts, bad, errors = [0] * threads, [0], []
    deadline = time.monotonic() + seconds

    def work(i):
        n = 0
        try:
            while time.monotonic() < deadline:
                msg = b"%d:%d" % (i, n)
                try:
                    verify(signer.sign(msg), msg)
                except Exception as e:
                    if type(e).__name__ == "InvalidSignature":
                        bad[0] += 1
                    else:
                        raise
                n += 1
        except Exception as e:
            errors.append(repr(e))
        counts[i] = n

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool: t.start()
    for t in pool: t.join()
    signer.close()
    print(json.dumps({"signed": sum(counts), "per_thread": counts, "bad": bad[0],
                      "errors": errors, "parallel": signer.parallel}))
    """
)


@pytest.mark.parametrize("serialize", ["0", "1"], ids=["os-locking", "one-lock"])
def test_sixteen_threads_sign_without_crash(softhsm: SoftHsm, es256: Any, serialize: str) -> None:
    # In a subprocess: a crash of the module (the failure this guards against) is a SIGSEGV,
    # which would take pytest down with it; here it is an exit code we assert on. Both modes:
    # OS locking (SoftHSM2) and one lock per module (tpm2-pkcs11, or forced by the env var).
    proc = subprocess.run(
        [sys.executable, "-c", _STRESS, es256.uri, softhsm.pin, "2.5", "16"],
        env={**os.environ, "SOFTHSM2_CONF": str(softhsm.conf), "PYTHONPATH": str(ROOT),
             "DPOP_HSM_PKCS11_SERIALIZE": serialize},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, f"stress run died (rc={proc.returncode}): {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == []
    assert result["bad"] == 0
    assert result["parallel"] is (serialize == "0")  # SoftHSM2 accepts CKF_OS_LOCKING_OK
    assert all(n > 0 for n in result["per_thread"]), result["per_thread"]
    assert result["signed"] >= 16


# --- faults --------------------------------------------------------------------------------


def _sign_ok(signer: Any) -> None:
    msg = b"fault-check"
    verify_signature(signer.public_jwk, msg, signer.sign(msg))


def test_session_closed_under_the_signer_is_reopened(es256: Any) -> None:
    _sign_ok(es256)
    # C_CloseAllSessions on the token: every session of the signer dies and the login with it.
    es256._module.close_all_sessions(es256._token.slot.slot_id)
    _sign_ok(es256)
    _sign_ok(es256)


def test_token_reinitialized_under_the_signer(softhsm: SoftHsm, tmp_path: Path) -> None:
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "k.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    softhsm.import_ec_key("fault", pem, label="imported", key_id=b"\x0a\x0b")
    with Pkcs11Signer(softhsm.uri("fault", object="imported"), secret=softhsm.pin) as signer:
        _sign_ok(signer)
        # Removed and re-inserted: the token directory is wiped and the same key imported
        # again into a new token with the same label (new serial, new slot id).
        softhsm.delete_token("fault")
        softhsm.init_token("fault")
        softhsm.import_ec_key("fault", pem, label="imported", key_id=b"\x0a\x0b")
        _sign_ok(signer)
        # Re-created with ANOTHER key under the same name: never sign with it silently.
        softhsm.delete_token("fault")
        softhsm.init_token("fault")
        other = tmp_path / "other.pem"
        other.write_bytes(
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        softhsm.import_ec_key("fault", other, label="imported", key_id=b"\x0a\x0b")
        with pytest.raises(KeyNotFoundError) as info:
            signer.sign(b"x")
        assert "changed" in str(info.value)


def test_other_signers_survive_a_module_reinit(es256: Any) -> None:
    # The previous test restarted the module (C_Finalize/C_Initialize); es256's sessions are
    # from the old generation and must be dropped, not reused.
    _sign_ok(es256)


def test_missing_token(softhsm: SoftHsm) -> None:
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    with pytest.raises(TokenNotPresentError) as info:
        Pkcs11Signer(softhsm.uri("absent-token", object="x"), secret=softhsm.pin)
    message = str(info.value)
    assert "no token matches token='absent-token' (tokens present: " in message
    assert "'dpop' (serial " in message  # lists the initialized tokens that are present
    assert "'' (serial" not in message  # not SoftHSM2's free, uninitialized slot
    assert "token token" not in message
    assert "pcscd" in info.value.diagnostics()  # the hint fits here: a token is missing


def test_missing_module_is_not_a_missing_token(tmp_path: Path) -> None:
    # A module that is not there is a setup problem with its own code and hint, naming what
    # was tried; never token_not_present with advice about pcscd.
    from dpop_hsm.errors import Pkcs11ModuleError, Pkcs11ModuleNotFoundError
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    missing = tmp_path / "libnone.so"
    for uri, names in (
        (f"pkcs11:token=dpop?module-path={missing}", [str(missing)]),
        ("pkcs11:token=dpop?module-name=no-such-p11", ["no-such-p11.so", "libno-such-p11.so"]),
    ):
        with pytest.raises(Pkcs11ModuleNotFoundError) as info:
            Pkcs11Signer(uri, allow_module_path=True)
        assert info.value.code == "pkcs11_module_not_found"
        assert not isinstance(info.value, TokenNotPresentError)
        for name in names:
            assert name in str(info.value)
        assert "pcscd" not in info.value.diagnostics()
    # A file that is there but is no PKCS#11 module: the loader's own reason.
    not_a_module = tmp_path / "libjunk.so"
    not_a_module.write_bytes(b"junk")
    with pytest.raises(Pkcs11ModuleError) as bad:
        Pkcs11Signer(f"pkcs11:token=dpop?module-path={not_a_module}", allow_module_path=True)
    assert bad.value.code == "pkcs11_module_error"
    assert str(not_a_module) in str(bad.value)


def test_untrusted_module_path_is_refused_on_every_entry_point(
    softhsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dpop_hsm.errors import UntrustedModuleError
    from dpop_hsm.signers import generate_signer
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    monkeypatch.delenv("DPOP_HSM_PKCS11_MODULES", raising=False)
    # A copy of the real module outside the trusted directories: the same code, untrusted place.
    copy = tmp_path / "libsofthsm2-copy.so"
    shutil.copyfile(softhsm.module, copy)
    uri = f"pkcs11:token=dpop;object=test-es256?module-path={copy}"
    attempts: tuple[Callable[[], object], ...] = (
        lambda: Pkcs11Signer(uri, secret=softhsm.pin),
        lambda: Pkcs11Signer.generate(uri.replace("test-es256", "x"), secret=softhsm.pin),
        lambda: load_signer(uri, secret=softhsm.pin),
        lambda: generate_signer(uri.replace("test-es256", "x"), secret=softhsm.pin),
    )
    for attempt in attempts:
        with pytest.raises(UntrustedModuleError):
            attempt()
    assert str(copy) not in Path("/proc/self/maps").read_text()  # never dlopen()ed
    # The trusted path itself (where resolve_module_name found it) needs no opt-in.
    with Pkcs11Signer(softhsm.uri(object="test-es256"), secret=softhsm.pin) as trusted:
        assert "module-path=" + softhsm.module in trusted.uri


_YKCS11 = textwrap.dedent(
    """
    import sys
    from dpop_hsm.errors import TokenNotPresentError
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer
    try:
        Pkcs11Signer("pkcs11:object=x?module-path=" + sys.argv[1], secret="123456")
    except TokenNotPresentError as e:
        print("TokenNotPresentError", e)
    """
)


def _require_ykcs11() -> None:
    if not Path(YKCS11).is_file():
        unavailable(f"ykcs11 not installed ({YKCS11})")


def test_ykcs11_without_yubikey_and_without_pcscd() -> None:
    _require_ykcs11()
    if Path("/run/pcscd/pcscd.comm").exists():
        pytest.skip("a system pcscd is running: the no-pcscd case cannot be staged here")
    proc = subprocess.run(
        [sys.executable, "-c", _YKCS11, YKCS11],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("TokenNotPresentError"), proc.stdout


def test_ykcs11_without_yubikey_with_pcscd() -> None:
    _require_ykcs11()
    pcscd, unshare = shutil.which("pcscd"), shutil.which("unshare")
    if pcscd is None or unshare is None or os.geteuid() != 0:
        pytest.skip("needs pcscd, unshare and root to run a private pcscd")
    # A private pcscd in its own mount namespace with a tmpfs /run: the real daemon, with no
    # trace on the host and no clash with a system pcscd.
    script = (
        "mount -t tmpfs dpop-test-run /run || exit 97; "
        f"{pcscd} -f -e >/dev/null 2>&1 & pid=$!; "
        "i=0; while [ ! -S /run/pcscd/pcscd.comm ] && [ $i -lt 50 ]; do "
        "sleep 0.1; i=$((i+1)); done; "
        f'"{sys.executable}" -c "$0" "$1"; rc=$?; kill $pid; wait $pid; exit $rc'
    )
    proc = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "sh", "-c", script, _YKCS11, YKCS11],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if proc.returncode == 97:
        pytest.skip("cannot mount a private /run (no CAP_SYS_ADMIN)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("TokenNotPresentError"), proc.stdout
    assert "tokens present: none" in proc.stdout


def test_wrong_pin_is_a_pin_error_never_retried_never_shown(
    softhsm: SoftHsm, caplog: pytest.LogCaptureFixture
) -> None:
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    # The "spare" token has no login from this process (a logged-in application gets
    # CKR_USER_ALREADY_LOGGED_IN whatever PIN it sends).
    wrong = "wrong-pin-7f3a9c"
    calls = []

    def pin() -> str:
        calls.append(1)
        return wrong

    caplog.set_level(logging.DEBUG)
    with pytest.raises(PinError) as info:
        Pkcs11Signer(softhsm.uri("spare"), secret=pin)
    assert calls == [1]
    err = info.value
    for text in (str(err), repr(err), err.diagnostics(), str(err.__cause__ or "")):
        assert wrong not in text
    assert all(wrong not in r.getMessage() for r in caplog.records)
    with pytest.raises(PinError):
        Pkcs11Signer(softhsm.uri("spare") + "&pin-value=" + wrong)


def test_pin_changed_under_the_signer_is_sent_once(softhsm: SoftHsm) -> None:
    import pkcs11

    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    # The PIN is changed while a signer is logged in; after its sessions die it must try the
    # old PIN exactly once and then refuse to send it again (each wrong try counts to a lock).
    Pkcs11Signer.generate(softhsm.uri("spare", object="pin-change"), secret=softhsm.pin).close()
    new_pin = softhsm.pin + "-new"
    with Pkcs11Signer(softhsm.uri("spare", object="pin-change"), secret=softhsm.pin) as signer:
        _sign_ok(signer)
        token = pkcs11.lib(softhsm.module).get_token(token_label="spare")
        with token.open(rw=True) as session:  # logged in through the signer
            session.set_pin(softhsm.pin, new_pin)
        try:
            signer._module.close_all_sessions(signer._token.slot.slot_id)
            with pytest.raises(PinError) as first:
                signer.sign(b"x")
            assert "rejected the PIN" in str(first.value)
            with pytest.raises(PinError) as second:
                signer.sign(b"x")
            assert "not sending it again" in str(second.value)
        finally:
            with Pkcs11Signer(softhsm.uri("spare", object="pin-change"), secret=new_pin) as other:
                token = pkcs11.lib(softhsm.module).get_token(token_label="spare")
                with token.open(rw=True) as session:
                    session.set_pin(new_pin, softhsm.pin)
                _sign_ok(other)


def test_pin_value_uri_warns_and_never_shows_the_pin(
    softhsm: SoftHsm, es256: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    with caplog.at_level(logging.WARNING, logger="dpop_hsm.pkcs11"):
        signer = Pkcs11Signer(es256.uri + "&pin-value=" + softhsm.pin)
    with signer:
        assert softhsm.pin not in repr(signer)
        assert softhsm.pin not in signer.uri
        _sign_ok(signer)
    assert any("pin-value" in r.getMessage() for r in caplog.records)
    assert all(softhsm.pin not in r.getMessage() for r in caplog.records)


def test_always_authenticate_key_and_wrong_context_pin(softhsm: SoftHsm, es256: Any) -> None:
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    _generate_pin_per_signature_key(softhsm, "test-always-auth", b"\x9c")
    pins = [softhsm.pin]
    asked = []

    def pin() -> str:
        asked.append(1)
        return pins[0]

    with Pkcs11Signer(softhsm.uri(object="test-always-auth"), secret=pin) as signer:
        assert signer.always_authenticate is True
        before = len(asked)
        _sign_ok(signer)
        _sign_ok(signer)
        assert len(asked) - before == 2  # one context login per signature
        pins[0] = "wrong-context-pin-1c2d"
        with pytest.raises(PinError) as info:
            signer.sign(b"x")
        assert "wrong-context-pin" not in str(info.value)
        pins[0] = softhsm.pin
        for _ in range(3):  # no session stuck in OperationActive
            _sign_ok(signer)

    # A PIN source that fails (a cancelled prompt) must not strand pooled sessions: with a pool
    # of one, a stranded session would make the next sign() wait forever.
    def cancelled() -> str:
        raise RuntimeError("prompt cancelled")

    with Pkcs11Signer(softhsm.uri(object="test-always-auth"), secret=pin, max_sessions=1) as signer:
        signer._secret = cancelled  # type: ignore[attr-defined]  # the prompt is cancelled now
        for _ in range(3):
            with pytest.raises(SecretSourceError):
                signer.sign(b"x")
        signer._secret = pin  # type: ignore[attr-defined]
        _sign_ok(signer)
    assert es256.always_authenticate is False


def test_fork_child_reinitializes(es256: Any) -> None:
    _sign_ok(es256)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not use the parent's sessions
        code = 1
        try:
            os.close(read)
            _sign_ok(es256)
            _sign_ok(es256)
            code = 0 if es256._module.pid == os.getpid() else 2
            os.write(write, b"ok" if code == 0 else b"stale module")
        except BaseException as e:  # report anything to the parent, then leave at once
            os.write(write, repr(e).encode()[:500])
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        message = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"child crashed: {status}"
    assert os.WEXITSTATUS(status) == 0, message
    assert message == "ok"
    _sign_ok(es256)  # the parent's sessions are untouched


def test_closed_signer_refuses(softhsm: SoftHsm, es256: Any) -> None:
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    with Pkcs11Signer(es256.uri, secret=softhsm.pin) as signer:
        _sign_ok(signer)
    with pytest.raises(SignerError):
        signer.sign(b"x")
    _sign_ok(es256)  # closing one signer leaves the shared login for the other


def test_signature_is_checked_independently(es256: Any) -> None:
    # A tampered message must fail with cryptography: guards against a verifier that accepts all.
    sig = es256.sign(b"message")
    verify_signature(es256.public_jwk, b"message", sig)
    with pytest.raises(InvalidSignature):
        verify_signature(es256.public_jwk, b"messagf", sig)


def test_pin_locked_maps_to_pin_locked_error() -> None:
    # SoftHSM2 never locks a PIN (12 wrong logins still answer CKR_PIN_INCORRECT), so the
    # CKR_PIN_LOCKED path is checked at the mapping functions that every login goes through.
    import pkcs11

    from dpop_hsm.errors import PinLockedError
    from dpop_hsm.signers.pkcs11.ckr import (
        CKR_PIN_INCORRECT,
        CKR_PIN_LOCKED,
        error_for_exception,
        error_for_rv,
    )

    assert type(error_for_rv(CKR_PIN_LOCKED, "token 't'")) is PinLockedError
    assert type(error_for_rv(CKR_PIN_INCORRECT, "token 't'")) is PinError
    assert type(error_for_exception(pkcs11.exceptions.PinLocked(), "sign")) is PinLockedError
    assert type(error_for_exception(pkcs11.exceptions.PinIncorrect(), "sign")) is PinError
    assert type(error_for_exception(pkcs11.exceptions.TokenNotPresent(), "sign")) is (
        TokenNotPresentError
    )


def test_one_ckr_table_for_return_values_and_exceptions() -> None:
    # The ctypes paths (login, admin, hot path) see CK_RV numbers, python-pkcs11 raises one
    # class per CKR code: both must land on the same error, with the same words.
    import pkcs11

    from dpop_hsm.errors import DeviceError
    from dpop_hsm.signers.pkcs11 import ckr

    for row in ckr._TABLE:
        assert row.exception is not None
        cls = getattr(pkcs11.exceptions, row.exception)  # a typo in the table fails here
        by_exception = ckr.error_for_exception(cls(), "what")
        assert type(by_exception) is row.error
        if row.value >= 0:
            by_rv = ckr.error_for_rv(row.value, "what")
            assert type(by_rv) is row.error
            assert str(by_rv) == str(by_exception) == f"what: {row.text} ({row.name})"
    unknown = ckr.error_for_rv(0x80000123, "what", "C_Sign")
    assert type(unknown) is DeviceError and "C_Sign" in str(unknown)
    # Our own errors are never mistaken for python-pkcs11's namesakes (DeviceError).
    assert not ckr.has_fault(DeviceError("x"), ckr.SESSION)
    assert ckr.has_fault(pkcs11.exceptions.DeviceError(), ckr.SESSION)
    assert ckr.has_fault(ckr.SessionLostError("x"), ckr.SESSION)


def test_old_import_paths_still_work() -> None:
    # The backend became a package; the modules it grew out of re-export the same objects.
    from dpop_hsm.signers import pkcs11 as package
    from dpop_hsm.signers import pkcs11_admin, pkcs11_module, pkcs11_uri
    from dpop_hsm.signers.pkcs11 import admin, cryptoki, locate, signer, uri

    assert package.Pkcs11Signer is signer.Pkcs11Signer
    assert package.load_pkcs11_reference is signer.load_pkcs11_reference
    assert pkcs11_module.load_module is cryptoki.load_module
    assert pkcs11_module.Module is cryptoki.Module
    assert pkcs11_module.SignBuffer is cryptoki.SignBuffer
    assert pkcs11_admin.init_token is admin.init_token
    assert pkcs11_admin.token_labels is admin.token_labels
    assert pkcs11_uri.Pkcs11Uri is uri.Pkcs11Uri
    assert pkcs11_uri.resolve_module_name is locate.resolve_module_name
    assert type(pkcs11_module.login_error(pkcs11_module.CKR_PIN_LOCKED, "t")).__name__ == (
        "PinLockedError"
    )
    with pytest.raises(AttributeError):
        package.NoSuchName  # noqa: B018


# --- the published key is the signing key ----------------------------------------------------


def _swap_public_object(softhsm: SoftHsm, key_id: bytes, label: str, donor_id: bytes) -> None:
    """Replace the public object named (id, label) by a copy of another pair's public key."""
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    token = pkcs11.lib(softhsm.module).get_token(token_label="dpop")
    with token.open(rw=True) as session:  # logged in through the module's signers
        donor = session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=donor_id)
        params, point = donor[Attribute.EC_PARAMS], donor[Attribute.EC_POINT]
        session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=key_id).destroy()
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                Attribute.KEY_TYPE: pkcs11.KeyType.EC,
                Attribute.TOKEN: True,
                Attribute.ID: key_id,
                Attribute.LABEL: label,
                Attribute.EC_PARAMS: params,
                Attribute.EC_POINT: point,
                Attribute.VERIFY: True,
            }
        )


def test_public_object_of_another_pair_is_refused(softhsm: SoftHsm, es256: Any) -> None:
    from dpop_hsm.errors import KeyMismatchError
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    _sign_ok(es256)  # the edits below use es256's login

    # The hostile token: the private key "mismatch" (id 77) sits beside a public object with
    # its id and label that holds ANOTHER pair's public key ("donor", id 78).
    Pkcs11Signer.generate(softhsm.uri(object="mismatch", id=b"\x77"), secret=softhsm.pin).close()
    with Pkcs11Signer.generate(
        softhsm.uri(object="donor", id=b"\x78"), secret=softhsm.pin
    ) as donor:
        donor_jkt = donor.thumbprint
    _swap_public_object(softhsm, b"\x77", "mismatch", donor_id=b"\x78")
    for uri in (softhsm.uri(object="mismatch"), softhsm.uri(id=b"\x77")):
        with pytest.raises(KeyMismatchError) as info:
            Pkcs11Signer(uri, secret=softhsm.pin)
        assert info.value.code == "key_pair_mismatch"
        assert "label='mismatch' id=77" in str(info.value)
        assert donor_jkt not in str(info.value)
    with Pkcs11Signer(softhsm.uri(object="donor"), secret=softhsm.pin) as honest:
        assert honest.thumbprint == donor_jkt  # the donor's own pair still loads


def test_private_key_replaced_under_a_live_signer_is_refused(softhsm: SoftHsm) -> None:
    import pkcs11
    from asn1crypto import core
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

    from dpop_hsm.errors import KeyMismatchError
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    uri = softhsm.uri(object="replaced", id=b"\x79")
    with Pkcs11Signer.generate(uri, secret=softhsm.pin) as signer:
        _sign_ok(signer)
        # Same id and label, same public object, another private key: the thumbprint cannot
        # tell, only a signature can.
        token = pkcs11.lib(softhsm.module).get_token(token_label="dpop")
        with token.open(rw=True) as session:
            session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=b"\x79").destroy()
            session.generate_keypair(
                KeyType.EC,
                mechanism=Mechanism.EC_KEY_PAIR_GEN,
                store=True,
                public_template={
                    Attribute.EC_PARAMS: core.ObjectIdentifier("1.2.840.10045.3.1.7").dump(),
                    Attribute.LABEL: "replaced-new-public",
                    Attribute.ID: b"\x7a",
                },
                private_template={Attribute.LABEL: "replaced", Attribute.ID: b"\x79"},
            )
        signer._module.close_all_sessions(signer._token.slot.slot_id)  # force a reconnect
        with pytest.raises(KeyMismatchError):
            signer.sign(b"x")


def test_key_with_a_pin_per_signature_is_proven_on_its_first_signature(
    softhsm: SoftHsm, es256: Any
) -> None:
    from dpop_hsm.errors import KeyMismatchError
    from dpop_hsm.signers.pkcs11 import Pkcs11Signer

    # A PIV-9c-like key (a PIN per signature) is not signed with at load — that would ask for
    # the PIN (and a touch) just to open it — so its first signature is the proof.
    _sign_ok(es256)  # es256's login (re-made if an earlier test closed all sessions) is ours
    _generate_pin_per_signature_key(softhsm, "always-mismatch", b"\x9d")
    Pkcs11Signer.generate(
        softhsm.uri(object="always-donor", id=b"\x9e"), secret=softhsm.pin
    ).close()
    _swap_public_object(softhsm, b"\x9d", "always-mismatch", donor_id=b"\x9e")
    asked: list[int] = []

    def pin() -> str:
        asked.append(1)
        return softhsm.pin

    with Pkcs11Signer(softhsm.uri(object="always-mismatch"), secret=pin) as signer:
        assert signer.always_authenticate
        loaded_with = len(asked)
        for _ in range(2):  # refused every time, not only the first
            with pytest.raises(KeyMismatchError):
                signer.sign(b"x")
        assert len(asked) == loaded_with + 2  # one context login per attempt, none extra
