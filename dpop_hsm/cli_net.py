"""Moved to :mod:`dpop_hsm.cli.net`; this module re-exports its names for old imports."""

from __future__ import annotations

from .cli.net import (
    DEMO_CLIENT_SECRET,
    cmd_request,
    cmd_serve,
    cmd_token,
    demo_clients,
    make_token_client,
    register,
)

__all__ = [
    "DEMO_CLIENT_SECRET",
    "cmd_request",
    "cmd_serve",
    "cmd_token",
    "demo_clients",
    "make_token_client",
    "register",
]
