"""Fixtures for the servers backend (filled in by its issue)."""
