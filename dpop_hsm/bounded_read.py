"""Reading a small file a user named (a secret file, a key file) without trusting what it is.

``st_size`` says nothing for a device or a pipe (``/dev/zero`` reports 0 and never ends), so
the read itself is bounded; the file is opened once and judged by ``fstat`` of that same
descriptor, so what is checked is what is read (no check-then-open race on the path).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from .errors import DPoPError

__all__ = ["read_bounded"]


def read_bounded(
    path: str | Path, limit: int, label: str, error: Callable[[str], DPoPError]
) -> tuple[bytes, os.stat_result]:
    """At most ``limit`` bytes of the file at ``path`` and its ``fstat``.

    ``label`` names the file in messages (say ``"key file '/k.pem'"``); every failure is
    ``error(message)``: unreadable, a directory, or more than ``limit`` bytes.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise error(f"cannot read {label}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{label} is a directory")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read {label}: {e.strerror}") from e
    finally:
        os.close(fd)
    if len(data) > limit:
        size = f"{limit // 1024} KiB" if limit < 1 << 20 else f"{limit >> 20} MiB"
        raise error(f"{label} is larger than {size}")
    return data, st
