"""Signers: the :class:`Signer` contract, the reference registry and the backends.

Backends (``software``, ``pkcs11``, ``tpm``) are separate modules imported on first use.
"""

from __future__ import annotations

from .base import Signer
from .registry import Generator, Loader, generate_signer, load_signer, register_scheme

__all__ = ["Generator", "Loader", "Signer", "generate_signer", "load_signer", "register_scheme"]
