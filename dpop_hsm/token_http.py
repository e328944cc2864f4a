"""Former home of the sans-IO HTTP values; they live in :mod:`dpop_hsm.sansio` now."""

from __future__ import annotations

from .sansio import Headers, HttpRequest, HttpResponse, Sender, header_values

__all__ = ["Headers", "HttpRequest", "HttpResponse", "Sender", "header_values"]
