"""Shared fixtures (helpers live in _helpers.py)."""
import pytest


@pytest.fixture
def force_backend(monkeypatch):
    """force_backend(name) sets SURGELLM_BACKEND for the rest of the test."""
    def _force(name):
        monkeypatch.setenv("SURGELLM_BACKEND", name)
    return _force
