"""RFC 7512 URI parsing, printing, module lookup and PIN resolution (no token needed)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpop_hsm.errors import (
    KeyReferenceError,
    Pkcs11ModuleError,
    Pkcs11ModuleNotFoundError,
    SecretSourceError,
    UntrustedModuleError,
)
from dpop_hsm.signers.pkcs11.locate import (
    MODULES_ENV,
    check_module_path,
    module_file_names,
    require_supported_platform,
)
from dpop_hsm.signers.pkcs11_uri import (
    PIN_ENV,
    Pkcs11Uri,
    module_search_dirs,
    resolve_module_name,
)

ROOT = Path(__file__).resolve().parent.parent


def test_parse_all_standard_attributes() -> None:
    # Every path and query attribute of RFC 7512 §2.3, with percent-encoding.
    u = Pkcs11Uri.parse(
        "pkcs11:token=My%20Token;manufacturer=SoftHSM%20project;serial=abc123;model=SoftHSM%20v2;"
        "library-manufacturer=Acme;library-description=Acme%20lib;library-version=2.6;"
        "slot-manufacturer=SM;slot-description=Slot%201;slot-id=42;object=dpop%2Fkey;"
        "type=private;id=%01%02%ff"
        "?pin-source=file:/run/pin&module-name=softhsm2&module-path=/opt/lib/p11.so"
    )
    assert u.token == "My Token"
    assert u.manufacturer == "SoftHSM project"
    assert u.serial == "abc123"
    assert u.model == "SoftHSM v2"
    assert u.library_manufacturer == "Acme"
    assert u.library_description == "Acme lib"
    assert u.library_version == "2.6"
    assert u.slot_manufacturer == "SM"
    assert u.slot_description == "Slot 1"
    assert u.slot_id == 42
    assert u.object == "dpop/key"
    assert u.type == "private"
    assert u.id == b"\x01\x02\xff"
    assert u.pin_source == "file:/run/pin"
    assert u.module_name == "softhsm2"
    assert u.module_path == "/opt/lib/p11.so"


@pytest.mark.parametrize(
    "text",
    [
        "pkcs11:",
        "pkcs11:token=dpop",
        "pkcs11:token=dpop;object=dpop-demo;type=private;id=%01%ab",
        "pkcs11:object=a%20b%3bc;x-vendor=v?module-path=/usr/lib/p.so&x-flag=1",
        "pkcs11:slot-id=0;object=%c3%a9t%c3%a9?pin-source=env:PIN",
    ],
)
def test_round_trip(text: str) -> None:
    u = Pkcs11Uri.parse(text)
    again = Pkcs11Uri.parse(str(u))
    assert again == u
    assert str(again) == str(u)


def test_id_printed_as_percent_bytes_and_unicode_label() -> None:
    u = Pkcs11Uri(token="t", object="été;x", id=b"\x00\xff")
    text = str(u)
    assert "id=%00%ff" in text
    assert "object=%C3%A9t%C3%A9%3Bx" in text
    assert Pkcs11Uri.parse(text).object == "été;x"


def test_pin_value_never_printed() -> None:
    u = Pkcs11Uri.parse("pkcs11:token=t?pin-value=s3cr3t-pin&module-name=x")
    assert u.pin_value == "s3cr3t-pin"
    assert "s3cr3t" not in str(u)
    assert "s3cr3t" not in repr(u)
    assert "pin-value=s3cr3t-pin" in u.to_string(include_pin=True)


def test_vendor_attributes_kept_in_order() -> None:
    u = Pkcs11Uri.parse("pkcs11:token=t;x-b=2;x-a=1?x-q=%20")
    assert u.vendor_path == (("x-b", "2"), ("x-a", "1"))
    assert u.vendor_query == (("x-q", " "),)


@pytest.mark.parametrize(
    ("text", "attribute"),
    [
        ("pkcs11:token=a;token=b", "token"),  # RFC 7512 §2.3: path attributes at most once
        ("pkcs11:colour=red", "colour"),  # unknown, non-vendor name: outside the grammar
        ("pkcs11:token=t?colour=red", "colour"),
        ("pkcs11:id=%zz", "id"),  # malformed percent-encoding
        ("pkcs11:object=%4", "object"),
        ("pkcs11:slot-id=abc", "slot-id"),
        ("pkcs11:slot-id=-1", "slot-id"),
        ("pkcs11:type=key", "type"),
        ("pkcs11:library-version=x.1", "library-version"),
        ("pkcs11:token", "token"),  # no '='
        ("pkcs11:object=%ff%fe", "object"),  # not UTF-8
        ("pkcs11:token=t?module-name=a&module-name=b", "module-name"),
        ("pkcs11:token=t?pin-source=file:/p&pin-value=1", "pin-source"),
    ],
)
def test_malformed_uris_name_the_attribute(text: str, attribute: str) -> None:
    with pytest.raises(KeyReferenceError) as info:
        Pkcs11Uri.parse(text)
    assert attribute in str(info.value)


@pytest.mark.parametrize(
    "text", ["pkcs12:token=a", "token=a", "pkcs11:token=a#frag", "pkcs11:\x01"]
)
def test_not_a_pkcs11_uri(text: str) -> None:
    with pytest.raises(KeyReferenceError):
        Pkcs11Uri.parse(text)


def test_scheme_is_case_insensitive() -> None:
    assert Pkcs11Uri.parse("PKCS11:token=a").token == "a"


# --- PIN resolution ------------------------------------------------------------------------


def test_pin_order_explicit_then_source_then_value_then_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("from-file\n", encoding="utf-8")
    monkeypatch.setenv(PIN_ENV, "from-env")
    with_source = Pkcs11Uri.parse(f"pkcs11:token=t?pin-source=file:{pin_file}")
    assert with_source.resolve_pin("explicit") == "explicit"
    assert with_source.resolve_pin(lambda: "callback") == "callback"
    assert with_source.resolve_pin() == "from-file"
    bare_path = Pkcs11Uri.parse(f"pkcs11:token=t?pin-source={pin_file}")
    assert bare_path.resolve_pin() == "from-file"
    monkeypatch.setenv("MY_TOKEN_PIN", "from-named-env")
    assert Pkcs11Uri.parse("pkcs11:token=t?pin-source=env:MY_TOKEN_PIN").resolve_pin() == (
        "from-named-env"
    )
    with caplog.at_level(logging.WARNING, logger="dpop_hsm.pkcs11"):
        assert Pkcs11Uri.parse("pkcs11:token=t?pin-value=inline-9f2").resolve_pin() == "inline-9f2"
    assert any("pin-value" in r.getMessage() for r in caplog.records)
    assert all("inline-9f2" not in r.getMessage() for r in caplog.records)
    assert Pkcs11Uri.parse("pkcs11:token=t").resolve_pin() == "from-env"
    monkeypatch.delenv(PIN_ENV)
    assert Pkcs11Uri.parse("pkcs11:token=t").resolve_pin() is None


def test_pin_source_errors_do_not_leak(tmp_path: Path) -> None:
    with pytest.raises(SecretSourceError) as info:
        Pkcs11Uri.parse(f"pkcs11:token=t?pin-source=file:{tmp_path}/missing").resolve_pin()
    assert "missing" in str(info.value)
    with pytest.raises(SecretSourceError):
        Pkcs11Uri.parse("pkcs11:token=t?pin-source=%7C/bin/echo%201234").resolve_pin()
    with pytest.raises(SecretSourceError):
        Pkcs11Uri.parse("pkcs11:token=t?pin-source=env:DPOP_HSM_TEST_UNSET_VAR").resolve_pin()


# --- module lookup -------------------------------------------------------------------------


def test_module_path_wins_and_must_exist(tmp_path: Path) -> None:
    lib = tmp_path / "libfake.so"
    lib.write_bytes(b"")
    u = Pkcs11Uri(module_path=str(lib), module_name="other")
    assert u.module(allow_module_path=True) == str(lib)
    with pytest.raises(Pkcs11ModuleNotFoundError):
        Pkcs11Uri(module_path=str(tmp_path / "none.so")).module(allow_module_path=True)


# --- which module files a URI may load ----------------------------------------------------


def test_module_path_outside_the_trusted_dirs_needs_an_opt_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MODULES_ENV, raising=False)
    lib = tmp_path / "libevil.so"
    lib.write_bytes(b"")
    u = Pkcs11Uri(module_path=str(lib))
    with pytest.raises(UntrustedModuleError) as info:
        u.module()
    message = str(info.value)
    for fix in ("module-name=", MODULES_ENV, "allow_module_path=True"):
        assert fix in message  # the error names every way out
    assert info.value.code == "untrusted_module"
    # Lexical tricks do not turn a path into a trusted one.
    for trick in (f"/usr/lib/../..{lib}", f"/usr/lib/pkcs11/../../..{lib}", "libevil.so"):
        with pytest.raises(UntrustedModuleError):
            check_module_path(trick)
    # The operator's allowlist (absolute paths, ':'-separated), or the caller's opt-in.
    monkeypatch.setenv(MODULES_ENV, f"relative/ignored.so:{tmp_path}/other.so:{lib}")
    assert u.module() == str(lib)
    monkeypatch.setenv(MODULES_ENV, f"{tmp_path}/other.so")
    with pytest.raises(UntrustedModuleError):
        u.module()
    assert u.module(allow_module_path=True) == str(lib)


def test_module_path_in_a_trusted_dir_or_registered_with_p11kit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MODULES_ENV, raising=False)
    trusted = tmp_path / "modules"
    trusted.mkdir()
    (trusted / "libacme.so").write_bytes(b"")
    monkeypatch.setenv("DPOP_HSM_PKCS11_MODULE_DIRS", str(trusted))
    assert Pkcs11Uri(module_path=str(trusted / "libacme.so")).module() == str(
        trusted / "libacme.so"
    )
    # Only directly inside: a subdirectory of a trusted directory is not trusted.
    (trusted / "sub").mkdir()
    (trusted / "sub" / "libacme.so").write_bytes(b"")
    with pytest.raises(UntrustedModuleError):
        Pkcs11Uri(module_path=str(trusted / "sub" / "libacme.so")).module()
    # The distribution's SoftHSM2, as resolve_module_name finds it, loads without an opt-in.
    try:
        softhsm = resolve_module_name("softhsm2")
    except Pkcs11ModuleNotFoundError:
        return
    assert check_module_path(softhsm) == softhsm


@pytest.mark.parametrize(
    "name", ["../etc/evil", "a/b", "..", ".", "..libx", "x\\y", "", "lib evil", ".hidden"]
)
def test_module_names_never_carry_a_path(name: str) -> None:
    with pytest.raises(KeyReferenceError, match="module-name"):
        resolve_module_name(name)


_CONSTRUCTOR_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void ran(void) {
    const char *marker = getenv("DPOP_HSM_TEST_MARKER");
    if (marker) { FILE *f = fopen(marker, "w"); if (f) { fputs("ran", f); fclose(f); } }
}
"""

_LOAD_CHILD = """
import sys
from dpop_hsm import load_signer
from dpop_hsm.errors import DPoPError, UntrustedModuleError
try:
    uri = "pkcs11:token=t?module-path=" + sys.argv[1]
    load_signer(uri, allow_module_path=sys.argv[2] == "allow")
except UntrustedModuleError:
    print("refused")
except DPoPError as e:
    print("loaded", e.code)
maps = open("/proc/self/maps").read()
print("mapped" if sys.argv[1] in maps else "not-mapped")
"""


def test_a_uri_cannot_make_us_run_a_library(tmp_path: Path) -> None:
    # The hostile input: a shared object whose constructor runs as soon as it is dlopen()ed.
    # Refused, it never runs and is never mapped; with the caller's opt-in the same URI does
    # run it (the positive control proving the refusal is what kept it out).
    pytest.importorskip("pkcs11", reason="python-pkcs11 (the 'pkcs11' extra) is not installed")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the hostile module")
    source = tmp_path / "evil.c"
    source.write_text(_CONSTRUCTOR_C, encoding="utf-8")
    lib = tmp_path / "libevil.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(source)], check=True, timeout=60)
    marker = tmp_path / "constructor-ran"
    env = {k: v for k, v in os.environ.items() if k != MODULES_ENV}
    env.update(PYTHONPATH=str(ROOT), DPOP_HSM_TEST_MARKER=str(marker))
    refused = subprocess.run(
        [sys.executable, "-c", _LOAD_CHILD, str(lib), "refuse"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert refused.stdout.split() == ["refused", "not-mapped"], refused.stderr
    assert not marker.exists()
    allowed = subprocess.run(
        [sys.executable, "-c", _LOAD_CHILD, str(lib), "allow"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert allowed.stdout.split()[0] == "loaded", allowed.stderr  # not a PKCS#11 module
    assert marker.read_text(encoding="utf-8") == "ran"


def test_module_name_lookup_in_search_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = tmp_path / "libacme-p11.so"
    lib.write_bytes(b"")
    monkeypatch.setenv("DPOP_HSM_PKCS11_MODULE_DIRS", str(tmp_path))
    assert tmp_path in module_search_dirs()
    for name in ("acme-p11", "libacme-p11", "libacme-p11.so"):
        assert resolve_module_name(name) == str(lib)
    assert Pkcs11Uri(module_name="acme-p11").module() == str(lib)
    with pytest.raises(Pkcs11ModuleNotFoundError) as info:
        resolve_module_name("no-such-module-xyz")
    assert "no-such-module-xyz" in str(info.value)
    with pytest.raises(KeyReferenceError):
        resolve_module_name("../etc/evil")


def test_default_dirs_include_distro_locations() -> None:
    dirs = {str(d) for d in module_search_dirs()}
    assert "/usr/lib/pkcs11" in dirs
    assert "/usr/lib/softhsm" in dirs
    assert "/usr/local/lib" in dirs


def test_no_module_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DPOP_HSM_PKCS11_MODULE", raising=False)
    with pytest.raises(KeyReferenceError) as info:
        Pkcs11Uri(token="t").module()
    assert "module-path" in str(info.value)


@pytest.mark.parametrize(
    ("text", "attribute"),
    [
        ("pkcs11:token=\udcff", "token"),  # a non-UTF-8 argv byte under surrogateescape
        ("pkcs11:x-a=\ud800", "x-a"),
        ("pkcs11:object=a?pin-value=\udc80", "pin-value"),
        ("pkcs11:slot-id=" + "1" * 5000, "slot-id"),  # would hit int()'s digit limit
        ("pkcs11:slot-id=18446744073709551616", "slot-id"),  # 2**64: not a CK_ULONG
    ],
)
def test_hostile_values_are_typed_errors(text: str, attribute: str) -> None:
    with pytest.raises(KeyReferenceError) as info:
        Pkcs11Uri.parse(text)
    assert attribute in str(info.value)


def test_largest_slot_id() -> None:
    assert Pkcs11Uri.parse("pkcs11:slot-id=18446744073709551615").slot_id == 2**64 - 1


def test_id_must_be_bytes() -> None:
    with pytest.raises(KeyReferenceError):
        Pkcs11Uri(id="01")  # type: ignore[arg-type]


@pytest.mark.parametrize("slot_id", [-1, 2**64])
def test_constructor_checks_slot_id_range_like_the_parser(slot_id: int) -> None:
    with pytest.raises(KeyReferenceError):
        Pkcs11Uri(slot_id=slot_id)


# --- platforms ----------------------------------------------------------------------------


def test_module_file_names_per_platform() -> None:
    assert module_file_names("softhsm2", "linux") == [
        "softhsm2.so",
        "softhsm2",
        "libsofthsm2.so",
        "libsofthsm2",
    ]
    # macOS: Yubico ships libykcs11.dylib; OpenSC and Homebrew's SoftHSM2 use .so there too.
    assert module_file_names("ykcs11", "darwin")[:3] == ["ykcs11.dylib", "ykcs11.so", "ykcs11"]
    assert "libykcs11.dylib" in module_file_names("ykcs11", "darwin")
    assert module_file_names("opensc-pkcs11.so", "darwin")[0] == "opensc-pkcs11.so"


def test_search_dirs_per_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DPOP_HSM_PKCS11_MODULE_DIRS", raising=False)
    mac = {str(d) for d in module_search_dirs("darwin")}
    for d in ("/opt/homebrew/lib", "/opt/homebrew/lib/softhsm", "/usr/local/lib/pkcs11"):
        assert d in mac
    assert "/Library/OpenSC/lib" in mac
    assert "/usr/lib/x86_64-linux-gnu" not in mac
    assert module_search_dirs("win32") == []


def test_windows_is_refused_plainly() -> None:
    # Windows Cryptoki packs structures to 1 byte; the ctypes layer does not: say so up front.
    for platform in ("win32", "cygwin"):
        with pytest.raises(Pkcs11ModuleError, match="Linux and macOS"):
            require_supported_platform(platform)
        with pytest.raises(Pkcs11ModuleError, match="Linux and macOS"):
            resolve_module_name("softhsm2", platform)
    require_supported_platform("linux")
    require_supported_platform("darwin")


# --- typos that get their own message -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "says"),
    [
        # '&' where '?' was meant: the query attribute would otherwise end up in the label
        ("pkcs11:token=x;object=y&module-name=z", "'&module-name=' in its path"),
        ("pkcs11:token=x&pin-source=file:/p?module-name=z", "'&pin-source=' in its path"),
        # ';' between query attributes
        ("pkcs11:token=x?module-name=z;pin-source=env:P", "separated by '&'"),
        ("pkcs11:token=x?module-name=z;object=k", "separated by '&'"),
        # an attribute on the wrong side of '?'
        ("pkcs11:token=x;module-name=z", "'module-name' is a query attribute"),
        ("pkcs11:token=x?module-name=z&object=k", "'object' is a path attribute"),
        ("pkcs11:token=x?object=k", "'object' is a path attribute"),
        # an authority, as in other URI schemes
        ("pkcs11://token=x;object=k", "no authority"),
        # capitals
        ("pkcs11:Token=x", "lower-case: 'token'"),
        ("pkcs11:token=x?Module-Name=z", "lower-case: 'module-name'"),
    ],
)
def test_common_typos_are_named(text: str, says: str) -> None:
    with pytest.raises(KeyReferenceError) as info:
        Pkcs11Uri.parse(text)
    assert says in str(info.value)


def test_escaped_separators_are_values_not_typos() -> None:
    u = Pkcs11Uri.parse("pkcs11:token=x;object=y%26module-name=z?pin-source=file:/a%3Bpin-value=b")
    assert u.object == "y&module-name=z"
    assert u.pin_source == "file:/a;pin-value=b"
    assert Pkcs11Uri.parse(str(u)) == u  # and they print escaped again


def test_describe_token_wording() -> None:
    assert Pkcs11Uri(token="dpop").describe_token() == "token='dpop'"
    assert Pkcs11Uri(token="t", serial="42").describe_token() == "token='t', serial='42'"
    assert Pkcs11Uri().describe_token() == "any token"
