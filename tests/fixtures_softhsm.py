"""Fixtures for the softhsm backend (filled in by its issue)."""
