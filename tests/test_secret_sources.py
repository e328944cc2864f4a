"""Secret sources (``env:NAME``, ``file:PATH``, values, callbacks) given hostile inputs: files
that never end, directories, pipes, several lines, undecodable text. Each must resolve to
exactly the secret or fail with a SecretSourceError that holds neither the secret nor an
exception that does."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from dpop_hsm.cli import EXIT_CODES
from dpop_hsm.errors import SecretSourceError
from dpop_hsm.secret_sources import MAX_SECRET_FILE, read_secret_source, resolve_secret
from dpop_hsm.signers.pkcs11_uri import Pkcs11Uri
from tests.support.cli import client_args, json_error, run_cli

SECRET = "s3cr3t-value-4711"


def from_file(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "secret"
    path.write_bytes(data)
    return read_secret_source(f"file:{path}", what="client secret")


def refused(tmp_path: Path, data: bytes) -> SecretSourceError:
    with pytest.raises(SecretSourceError) as info:
        from_file(tmp_path, data)
    error = info.value
    assert SECRET not in str(error) and error.__cause__ is None and error.__context__ is None
    return error


@pytest.mark.parametrize(
    ("data", "secret"),
    [
        (SECRET.encode(), SECRET),
        (SECRET.encode() + b"\n", SECRET),  # echo secret > file
        (SECRET.encode() + b"\r\n", SECRET),  # written on Windows
        (b"", ""),
        (b" " + SECRET.encode() + b" \n", " " + SECRET + " "),  # only the line ending goes
        (b"sec\x0bret\x1c\n", "sec\x0bret\x1c"),  # str.splitlines() would cut at \x0b
        ("pässwörd\u2028x\n".encode(), "pässwörd\u2028x"),
    ],
)
def test_exactly_one_line_ending_is_stripped(tmp_path: Path, data: bytes, secret: str) -> None:
    assert from_file(tmp_path, data) == secret


@pytest.mark.parametrize(
    "data",
    [
        SECRET.encode() + b"\n\n",
        b"-----BEGIN PRIVATE KEY-----\n" + SECRET.encode() + b"\n-----END PRIVATE KEY-----\n",
        b"CLIENT_ID=x\nCLIENT_SECRET=" + SECRET.encode() + b"\n",
        SECRET.encode() + b"\rtail",
    ],
    ids=["blank-line", "key-file", "env-file", "bare-cr"],
)
def test_more_than_one_line_is_refused_not_cut(tmp_path: Path, data: bytes) -> None:
    assert "more than one line" in str(refused(tmp_path, data))


def test_undecodable_file_is_refused(tmp_path: Path) -> None:
    assert "UTF-8" in str(refused(tmp_path, SECRET.encode() + b"\xff\n"))


def test_huge_file_is_refused(tmp_path: Path) -> None:
    assert "64 KiB" in str(refused(tmp_path, b"x" * (MAX_SECRET_FILE + 1)))
    assert len(from_file(tmp_path, b"x" * MAX_SECRET_FILE)) == MAX_SECRET_FILE


def test_endless_device_is_refused() -> None:
    # read_text() read /dev/zero until memory ran out.
    with pytest.raises(SecretSourceError, match="64 KiB"):
        read_secret_source("file:/dev/zero", what="PIN")


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SecretSourceError, match="is a directory"):
        read_secret_source(f"file:{tmp_path}", what="PIN")


def test_pipe_is_read_like_a_file() -> None:
    # file:/dev/fd/N is how a shell's <(pass show x) arrives; the writer may be slow.
    read_end, write_end = os.pipe()
    try:

        def writer() -> None:
            with os.fdopen(write_end, "wb") as f:
                f.write(SECRET.encode() + b"\n")

        thread = threading.Thread(target=writer)
        thread.start()
        assert read_secret_source(f"file:/dev/fd/{read_end}", what="PIN") == SECRET
        thread.join()
    finally:
        os.close(read_end)


def test_unset_and_empty_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DPOP_TEST_UNSET_SECRET", raising=False)
    with pytest.raises(SecretSourceError, match=r"DPOP_TEST_UNSET_SECRET.*not set"):
        read_secret_source("env:DPOP_TEST_UNSET_SECRET", what="PIN")
    with pytest.raises(SecretSourceError, match="not set"):
        read_secret_source("env:", what="PIN")


def test_undecodable_environment_is_refused_without_a_chained_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # os.environ turns the byte 0xff into a lone surrogate; encoding it later (C_Login, the
    # Authorization header) raised a UnicodeEncodeError whose .object is the whole secret.
    hostile = SECRET + "\udcff"
    monkeypatch.setenv("DPOP_TEST_HOSTILE_SECRET", hostile)
    monkeypatch.setenv("DPOP_HSM_PIN", hostile)
    attempts: list[Callable[[], object]] = [
        lambda: read_secret_source("env:DPOP_TEST_HOSTILE_SECRET", what="PIN"),
        lambda: resolve_secret(hostile, what="PIN"),
        lambda: resolve_secret(lambda: hostile, what="PIN"),
        lambda: resolve_secret(SECRET.encode() + b"\xff", what="PIN"),
        lambda: Pkcs11Uri.parse("pkcs11:token=t").resolve_pin(),  # $DPOP_HSM_PIN
    ]
    for attempt in attempts:
        with pytest.raises(SecretSourceError) as info:
            attempt()
        error = info.value
        assert SECRET not in str(error) and error.__cause__ is None and error.__context__ is None


# --- through the CLI ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expect"),
    [
        ("file:/dev/zero", "64 KiB"),
        ("file:{tmp}", "is a directory"),
        ("file:{tmp}/two-lines", "more than one line"),
        ("env:DPOP_TEST_NOT_SET", "not set"),
    ],
)
def test_cli_secret_sources_fail_cleanly(
    served: dict[str, str], pem_key: str, tmp_path: Path, source: str, expect: str
) -> None:
    (tmp_path / "two-lines").write_text(f"first-{SECRET}\nsecond-{SECRET}\n")
    args = client_args(served)
    args[args.index("env:TEST_CLIENT_SECRET")] = source.format(tmp=tmp_path)
    result = run_cli("token", "--key", pem_key, *args, "--json", timeout=30)
    assert result.returncode == EXIT_CODES["configuration"]
    error = json_error(result)
    assert error["code"] == "secret_source_error" and expect in error["message"]
    assert SECRET not in result.stdout + result.stderr
