"""Shared fixtures. Backend fixture modules live in ``tests/support/`` and are registered here
as plugins, so each backend's setup (SoftHSM2 token, swtpm, local servers) has its own file.

``tests.support`` is registered for assertion rewriting before anything imports it: its helpers
(the independent proof verifier, the raw socket server) assert, and a plain ``assert`` in a
helper must report as well as one in a test.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("tests.support")

pytest_plugins = [
    "tests.support.softhsm",
    "tests.support.tpm",
    "tests.support.servers",
    "tests.support.cli",
    "tests.support.redis",
]
