"""Old import path of :mod:`dpop_hsm.signers.pkcs11.admin` (token initialization); kept working."""

from __future__ import annotations

from .pkcs11.admin import init_token, token_labels

__all__ = ["init_token", "token_labels"]
