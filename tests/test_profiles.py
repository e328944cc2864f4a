"""Login profiles on disk: location, modes from creation, atomic writes, locking, validation."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dpop_hsm.errors import (
    ProfileCorruptError,
    ProfileError,
    ProfileLockedError,
    ProfileNotFoundError,
    ProfilePermissionError,
)
from dpop_hsm.profiles import (
    Profile,
    ProfileStore,
    default_state_dir,
    validate_key_reference,
    validate_profile_name,
)

ISSUER = "https://as.example.com"
JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"  # RFC 9449 example key's jkt
REFRESH = "rt-secret-value-0123456789"
ACCESS = "at-secret-value-9876543210"


def profile(name: str = "dev", **changes: Any) -> Profile:
    base = Profile(
        name=name,
        issuer=ISSUER,
        metadata={"issuer": ISSUER, "token_endpoint": ISSUER + "/token"},
        client_id="cli-app",
        auth_method="none",
        key="pkcs11:token=YubiKey%20PIV;id=%01?module-name=libykcs11.so&pin-source=env:PIN",
        jkt=JKT,
        scope="openid offline_access",
        resource=("https://api.example.com",),
        refresh_token=REFRESH,
        access_token=ACCESS,
        token_type="DPoP",
        expires_at=1_900_000_000.0,
        created_at=1_800_000_000.0,
        updated_at=1_800_000_000.0,
    )
    return replace(base, **changes)


@pytest.fixture
def store(tmp_path: Path) -> ProfileStore:
    return ProfileStore(tmp_path / "state")


# --- where --------------------------------------------------------------------------------


def test_state_dir_order(tmp_path: Path) -> None:
    assert default_state_dir({"DPOP_HSM_STATE_DIR": "/x/y", "XDG_STATE_HOME": "/s"}) == Path("/x/y")
    assert default_state_dir({"XDG_STATE_HOME": "/s", "HOME": "/h"}) == Path("/s/dpop-hsm")
    # XDG Base Directory: a relative XDG_STATE_HOME is invalid and ignored.
    assert default_state_dir({"XDG_STATE_HOME": "rel", "HOME": "/h"}) == Path(
        "/h/.local/state/dpop-hsm"
    )
    assert default_state_dir({"HOME": "/h"}) == Path("/h/.local/state/dpop-hsm")


def test_store_uses_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DPOP_HSM_STATE_DIR", str(tmp_path / "env-state"))
    assert ProfileStore().directory == tmp_path / "env-state"


# --- round trip, modes, atomicity ------------------------------------------------------------


def test_round_trip_and_modes(store: ProfileStore) -> None:
    old = os.umask(0)  # modes come from creation, not from a friendly umask
    try:
        store.save(profile())
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    path = store.path_for("dev")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.directory / "dev.lock").st_mode) == 0o600
    loaded = store.load("dev")
    assert loaded == profile()
    assert store.names() == ["dev"]
    assert sorted(os.listdir(store.directory)) == ["dev.json", "dev.lock"]  # no temp files


def test_modes_are_set_at_creation_not_by_chmod(
    store: ProfileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("chmod after creation leaves a window")

    monkeypatch.setattr(os, "chmod", refuse)
    monkeypatch.setattr(os, "fchmod", refuse)
    store.save(profile())
    assert stat.S_IMODE(os.stat(store.path_for("dev")).st_mode) == 0o600


def test_writes_are_fsynced_and_renamed(
    store: ProfileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    renamed: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    def rename(src: Any, dst: Any, **dir_fds: int) -> None:
        # Relative to the one checked directory descriptor, source and target alike.
        assert set(dir_fds) == {"src_dir_fd", "dst_dir_fd"}
        assert len(set(dir_fds.values())) == 1
        renamed.append((os.fspath(src), os.fspath(dst)))
        real_replace(src, dst, **dir_fds)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", rename)
    store.save(profile())
    assert len(synced) >= 2  # the file, then the directory
    assert len(renamed) == 1 and renamed[0][1] == store.path_for("dev").name
    assert "/" not in renamed[0][0] and renamed[0][0].startswith(".dev.")


def test_failed_write_keeps_the_old_profile(
    store: ProfileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.save(profile())

    def broken(src: Any, dst: Any, **dir_fds: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(ProfileError):
        store.save(profile(refresh_token="rt-new"))
    monkeypatch.undo()
    assert store.load("dev").refresh_token == REFRESH
    assert sorted(os.listdir(store.directory)) == ["dev.json", "dev.lock"]


def test_repr_and_file_hold_no_more_secrets_than_the_tokens(store: ProfileStore) -> None:
    p = profile()
    assert REFRESH not in repr(p) and ACCESS not in repr(p)
    store.save(p)
    document = json.loads(store.path_for("dev").read_text())
    assert set(document) == {
        "version",
        "name",
        "issuer",
        "metadata",
        "client_id",
        "auth_method",
        "key",
        "jkt",
        "scope",
        "resource",
        "refresh_token",
        "access_token",
        "token_type",
        "expires_at",
        "allow_bearer",
        "client_secret_source",
        "assertion_key",
        "created_at",
        "updated_at",
    }


def test_delete(store: ProfileStore) -> None:
    store.save(profile())
    assert store.delete("dev") is True
    assert store.delete("dev") is False
    with pytest.raises(ProfileNotFoundError):
        store.load("dev")
    assert store.names() == []


def test_missing(store: ProfileStore) -> None:
    with pytest.raises(ProfileNotFoundError):
        store.load("nope")  # no directory yet
    store.ensure_dir()
    with pytest.raises(ProfileNotFoundError):
        store.load("nope")
    assert store.names() == []


# --- permissions ---------------------------------------------------------------------------


def test_refuses_an_open_directory(store: ProfileStore) -> None:
    store.save(profile())
    os.chmod(store.directory, 0o755)
    with pytest.raises(ProfilePermissionError):
        store.load("dev")
    with pytest.raises(ProfilePermissionError):
        store.save(profile())


def test_refuses_a_readable_file(store: ProfileStore) -> None:
    store.save(profile())
    os.chmod(store.path_for("dev"), 0o644)
    with pytest.raises(ProfilePermissionError):
        store.load("dev")


def test_refuses_a_symlinked_profile(store: ProfileStore, tmp_path: Path) -> None:
    store.ensure_dir()
    target = tmp_path / "elsewhere.json"
    target.write_bytes(profile().to_json())
    os.chmod(target, 0o600)
    os.symlink(target, store.path_for("dev"))
    with pytest.raises(ProfilePermissionError):
        store.load("dev")


def test_refuses_a_directory_in_place_of_a_profile(store: ProfileStore) -> None:
    store.ensure_dir()
    os.mkdir(store.path_for("dev"), 0o700)
    with pytest.raises(ProfileError):
        store.load("dev")


# --- names and key references ------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../x", "a/b", ".hidden", "-x", "a" * 65, "a\x00", "é", "a b", 7]
)
def test_hostile_profile_names(name: Any) -> None:
    with pytest.raises(ProfileError):
        validate_profile_name(name)


@pytest.mark.parametrize("name", ["default", "work.prod", "a-b_c", "A1", "x" * 64])
def test_good_profile_names(name: str) -> None:
    assert validate_profile_name(name) == name


@pytest.mark.parametrize(
    "ref",
    [
        "pkcs11:token=t;object=k?pin-value=123456",
        "pkcs11:token=t;object=k?module-name=x.so&PIN-VALUE=123456",
        "pkcs11:token=t;pin-value=123456",
        "-----BEGIN PRIVATE KEY-----\nMIG...\n-----END PRIVATE KEY-----",
        '{"kty":"EC","d":"secret"}',
        "",
        "key.pem\x00",
        "x" * 5000,
    ],
)
def test_key_references_with_secrets_are_refused(ref: str) -> None:
    with pytest.raises(ProfileError) as info:
        validate_key_reference(ref)
    assert "123456" not in str(info.value) and "secret" not in str(info.value)


@pytest.mark.parametrize(
    "ref",
    [
        "pkcs11:token=t;object=k?pin-source=file:/run/pin",
        "tpm2:0x81000001",
        "/home/dev/key.pem",
        "file:///home/dev/key.pem",
    ],
)
def test_key_references_without_secrets(ref: str) -> None:
    assert validate_key_reference(ref) == ref


def test_profile_refuses_pin_in_key() -> None:
    with pytest.raises(ProfileCorruptError):
        profile(key="pkcs11:token=t?pin-value=1234")


# --- corrupt files -------------------------------------------------------------------------


def write_raw(store: ProfileStore, data: bytes, name: str = "dev") -> None:
    store.ensure_dir()
    fd = os.open(store.path_for(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def document(**changes: Any) -> bytes:
    data = json.loads(profile().to_json())
    for key, value in changes.items():
        if value is _DROP:
            data.pop(key)
        else:
            data[key] = value
    return json.dumps(data).encode()


_DROP = object()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b"\xff\xfe{}",
        b'{"version":1,"version":1}',
        document(version=2),
        document(version=True),
        document(version=_DROP),
        document(name="other"),
        document(surprise="member"),
        document(issuer=_DROP),
        document(issuer=5),
        document(issuer="https://evil.example"),  # metadata issuer no longer matches
        document(metadata={"issuer": ISSUER, "token_endpoint": "http://evil.example/t"}),
        document(metadata="x"),
        document(client_id=""),
        document(auth_method="client_secret_jwt"),
        document(jkt="short"),
        document(scope=["a"]),
        document(resource="https://api.example.com"),
        document(resource=[1]),
        document(refresh_token=""),
        document(refresh_token="a b"),
        document(access_token="é"),
        document(expires_at="soon"),
        document(expires_at=-1),
        document(expires_at=True),
        document(allow_bearer="yes"),
        document(client_secret_source="hunter2"),
        document(key="pkcs11:token=t?pin-value=1234"),
        document(created_at=None),
        b'{"expires_at": 1e999}',
        b" " * (1024 * 1024 + 1),
    ],
)
def test_corrupt_profiles_are_typed_errors(store: ProfileStore, data: bytes) -> None:
    write_raw(store, data)
    with pytest.raises(ProfileCorruptError) as info:
        store.load("dev")
    assert "1234" not in str(info.value) and "hunter2" not in str(info.value)
    assert REFRESH not in str(info.value)


def test_client_secret_source_name_is_allowed(store: ProfileStore) -> None:
    store.save(
        profile(client_secret_source="env:MY_CLIENT_SECRET", auth_method="client_secret_basic")
    )
    assert store.load("dev").client_secret_source == "env:MY_CLIENT_SECRET"


def test_names_ignore_strangers(store: ProfileStore) -> None:
    store.save(profile())
    (store.directory / "notes.txt").write_text("x")
    (store.directory / ".dev.abc.tmp").write_text("x")
    (store.directory / "..json").write_text("x")
    assert store.names() == ["dev"]


# --- locking -------------------------------------------------------------------------------


def test_lock_excludes_a_second_holder(store: ProfileStore) -> None:
    with store.locked("dev") as handle:
        assert handle.load() is None
        with pytest.raises(ProfileLockedError), store.locked("dev", timeout=0.1):
            pass
        handle.save(profile())
    with store.locked("dev", timeout=0.1) as handle:
        loaded = handle.load()
        assert loaded is not None and loaded.refresh_token == REFRESH
        with pytest.raises(ProfileError):
            handle.save(profile(name="other"))


def test_lock_serializes_threads(store: ProfileStore) -> None:
    store.save(profile(scope="0"))

    def bump() -> None:
        for _ in range(10):
            with store.locked("dev") as handle:
                current = handle.load()
                assert current is not None
                handle.save(replace(current, scope=str(int(current.scope or "0") + 1)))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.load("dev").scope == "40"


def test_lock_excludes_another_process(store: ProfileStore) -> None:
    store.ensure_dir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from dpop_hsm.profiles import ProfileStore\n"
            "with ProfileStore(sys.argv[1]).locked('dev'):\n"
            "    print('locked', flush=True)\n"
            "    sys.stdin.readline()\n",
            str(store.directory),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(ProfileLockedError), store.locked("dev", timeout=0.2):
            pass
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=30)
        if holder.stdout is not None:
            holder.stdout.close()
    with store.locked("dev", timeout=10):
        pass
