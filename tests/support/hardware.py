"""Skip-or-fail for hardware backends: a developer without SoftHSM2/swtpm gets a skip with the
reason; CI (``DPOP_HSM_REQUIRE_HARDWARE=1``, set by scripts/test) gets a failure instead, so a
broken install step can never turn the hardware suite green by skipping it."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def hardware_required() -> bool:
    return os.environ.get("DPOP_HSM_REQUIRE_HARDWARE", "") not in ("", "0")


def unavailable(reason: str) -> NoReturn:
    if hardware_required():
        pytest.fail(f"required hardware backend unavailable: {reason}", pytrace=False)
    pytest.skip(reason)
