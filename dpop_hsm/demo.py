"""Moved to :mod:`dpop_hsm.cli.demo`; this module re-exports its names for old imports."""

from __future__ import annotations

from .cli.demo import DEMO_CLIENT_SECRET, cmd_demo, register, run_demo

__all__ = ["DEMO_CLIENT_SECRET", "cmd_demo", "register", "run_demo"]
