"""Login profiles against a local attacker and against crashes: the state directory swapped,
linked or left open, a hostile umask, a writer killed mid-write, hostile files in place of a
profile. Each test builds the hostile situation on disk and checks where the refresh token
ends up (or that it is refused, with a message that holds no token)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dpop_hsm.errors import (
    ProfileCorruptError,
    ProfileError,
    ProfileNotFoundError,
    ProfilePermissionError,
)
from dpop_hsm.profiles import Profile, ProfileStore

ISSUER = "https://as.example.com"
JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
REFRESH = "rt-attack-secret-0123456789"


def profile(name: str = "dev", **changes: Any) -> Profile:
    base = Profile(
        name=name,
        issuer=ISSUER,
        metadata={"issuer": ISSUER, "token_endpoint": ISSUER + "/token"},
        client_id="cli-app",
        auth_method="none",
        key="/home/dev/key.pem",
        jkt=JKT,
        refresh_token=REFRESH,
        created_at=1_800_000_000.0,
        updated_at=1_800_000_000.0,
    )
    return replace(base, **changes)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def holds_the_token(directory: Path) -> list[str]:
    """Files under ``directory`` with the refresh token in them."""
    found = []
    for entry in directory.rglob("*"):
        if entry.is_file() and not entry.is_symlink() and REFRESH.encode() in entry.read_bytes():
            found.append(entry.name)
    return found


# --- the directory ---------------------------------------------------------------------------


def test_umask_000_gives_no_world_writable_parent(tmp_path: Path) -> None:
    # mkdir -p under umask 000 would make ~/.local and ~/.local/state 0777: another user
    # could then replace state/dpop-hsm with a directory of theirs.
    store = ProfileStore(tmp_path / "home" / ".local" / "state" / "dpop-hsm")
    old = os.umask(0)
    try:
        store.save(profile())
    finally:
        os.umask(old)
    for path in (tmp_path / "home", tmp_path / "home" / ".local", store.directory.parent):
        assert mode(path) == 0o700, path
    assert mode(store.directory) == 0o700 and mode(store.path_for("dev")) == 0o600


def test_state_dir_linked_into_an_open_directory_is_refused(tmp_path: Path) -> None:
    # The attacker's directory: world-writable, like a directory in /tmp.
    theirs = tmp_path / "attacker"
    theirs.mkdir()
    os.chmod(theirs, 0o777)
    link = tmp_path / "state"
    os.symlink(theirs, link)
    store = ProfileStore(link)
    with pytest.raises(ProfilePermissionError) as info:
        store.save(profile())
    assert "chmod 700" in str(info.value) and REFRESH not in str(info.value)
    assert os.listdir(theirs) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_state_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "attacker"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)  # nobody's, mode 0700: only the owner check refuses it
    link = tmp_path / "state"
    os.symlink(theirs, link)
    with pytest.raises(ProfilePermissionError):
        ProfileStore(link).save(profile())
    assert os.listdir(theirs) == []


def test_state_dir_linked_to_a_directory_of_ours_is_used(tmp_path: Path) -> None:
    # Dotfile setups link ~/.local/state elsewhere: a private directory of ours is fine.
    ours = tmp_path / "elsewhere"
    ours.mkdir(mode=0o700)
    os.symlink(ours, tmp_path / "state")
    store = ProfileStore(tmp_path / "state")
    store.save(profile())
    assert store.load("dev").refresh_token == REFRESH
    assert holds_the_token(ours) == ["dev.json"]


def test_swapping_the_directory_during_a_write_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    link = tmp_path / "state"
    os.symlink(ours, link)
    store = ProfileStore(link)
    real_fsync = os.fsync
    swapped: list[bool] = []

    def swap_then_fsync(fd: int) -> None:
        # The first fsync is the temporary file's: after the directory was checked, before
        # the rename. The attacker re-points the link now.
        if not swapped:
            os.unlink(link)
            os.symlink(theirs, link)
            swapped.append(True)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", swap_then_fsync)
    store.save(profile())
    monkeypatch.undo()
    assert swapped == [True]
    assert holds_the_token(theirs) == [] and os.listdir(theirs) == []
    assert holds_the_token(ours) == ["dev.json"]


def test_dangling_link_as_state_dir_is_a_typed_error(tmp_path: Path) -> None:
    os.symlink(tmp_path / "not-there-yet", tmp_path / "state")
    store = ProfileStore(tmp_path / "state")
    with pytest.raises(ProfileError):
        store.save(profile())
    with pytest.raises(ProfileNotFoundError):
        store.load("dev")
    assert not (tmp_path / "not-there-yet").exists()


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("x")
    with pytest.raises(ProfileError):
        ProfileStore(tmp_path / "state").save(profile())


# --- the file --------------------------------------------------------------------------------


def test_readable_profile_is_refused_not_repaired(tmp_path: Path) -> None:
    # ssh's rule for private keys: what others could read may have been read; say how to fix
    # it, and change nothing behind the user's back.
    store = ProfileStore(tmp_path / "state")
    store.save(profile())
    os.chmod(store.path_for("dev"), 0o644)
    with pytest.raises(ProfilePermissionError) as info:
        store.load("dev")
    assert "chmod 600" in str(info.value) and REFRESH not in str(info.value)
    assert mode(store.path_for("dev")) == 0o644


def test_fifo_in_place_of_a_profile_does_not_block(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path / "state")
    store.ensure_dir()
    os.mkfifo(store.path_for("dev"), 0o600)  # nobody ever writes to it
    with pytest.raises(ProfileCorruptError):
        store.load("dev")


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 200_000,  # nesting deeper than any parser's stack
        b'{"version": 1, "name": "dev", "metadata": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001,
        b'{"version": 1, "name": "dev", "expires_at": 1' + b"0" * 5000 + b"}",
        b'{"version": 1, "name": "dev", "refresh_token": "\\ud800"}',
        b'{"version": 1, "name": "dev\xc3"}',
        profile().to_json().replace(b'"client_id"', b'"name": "dev", "client_id"'),
    ],
    ids=["deep-array", "deep-metadata", "huge-int", "lone-surrogate", "not-utf8", "dup-name"],
)
def test_hostile_json_is_a_typed_error(tmp_path: Path, data: bytes) -> None:
    store = ProfileStore(tmp_path / "state")
    store.ensure_dir()
    fd = os.open(store.path_for("dev"), os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    with pytest.raises(ProfileCorruptError) as info:
        store.load("dev")
    assert len(str(info.value)) < 500


# --- crashes ---------------------------------------------------------------------------------

_CRASHING_WRITER = """
import os, sys
from dataclasses import replace
from dpop_hsm.profiles import ProfileStore
store = ProfileStore(sys.argv[1])
new = replace(store.load("dev"), refresh_token=sys.argv[2])
def crash(*args, **kwargs):
    os._exit(9)  # killed after the temporary file is written, before the rename
os.replace = crash
store.save(new)
"""


def test_a_writer_killed_mid_write_leaves_the_old_profile_and_no_token_behind(
    tmp_path: Path,
) -> None:
    store = ProfileStore(tmp_path / "state")
    store.save(profile(refresh_token="rt-old-0001"))
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASHING_WRITER, str(store.directory), REFRESH], timeout=60
    )
    assert crashed.returncode == 9
    assert store.load("dev").refresh_token == "rt-old-0001"  # never a torn file
    leftovers = [e for e in os.listdir(store.directory) if e.endswith(".tmp")]
    assert len(leftovers) == 1 and holds_the_token(store.directory) == leftovers
    # Another profile's writer leaves it alone; the next write of this profile removes it.
    store.save(profile(name="dev.other", refresh_token="rt-other-0002"))
    assert holds_the_token(store.directory) == leftovers
    store.save(profile(refresh_token="rt-next-0003"))
    assert holds_the_token(store.directory) == []
    assert sorted(os.listdir(store.directory)) == [
        "dev.json",
        "dev.lock",
        "dev.other.json",
        "dev.other.lock",
    ]


def test_delete_removes_a_crashed_writers_temporary_file(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path / "state")
    store.save(profile(refresh_token="rt-old-0001"))
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASHING_WRITER, str(store.directory), REFRESH], timeout=60
    )
    assert crashed.returncode == 9 and holds_the_token(store.directory) != []
    assert store.delete("dev") is True  # logout: no refresh token stays in the directory
    assert holds_the_token(store.directory) == [] and os.listdir(store.directory) == ["dev.lock"]
