"""Fixtures for the tpm backend (filled in by its issue)."""
