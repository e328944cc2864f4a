"""Shared fixtures. Backend fixture modules are registered here as plugins so each backend's
setup (SoftHSM2 token, swtpm, local servers) lives in its own file."""

from __future__ import annotations

pytest_plugins = [
    "tests.fixtures_softhsm",
    "tests.fixtures_tpm",
    "tests.fixtures_servers",
    "tests.fixtures_redis",
]
