"""Shared fixtures (helpers live in _helpers.py and its siblings, imported
as plain modules by the tests in ops/, nn/ and surgellm/)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def force_backend(monkeypatch):
    """force_backend(name) sets SURGELLM_BACKEND for the rest of the test."""

    def _force(name):
        monkeypatch.setenv("SURGELLM_BACKEND", name)

    return _force


# Hypothesis (tests/test_properties.py): "ci", the default, is derandomized
# (the same examples on every run) with no deadline (the Triton interpreter
# is slow) and no example database; HYPOTHESIS_PROFILE=long draws ten times
# as many examples (each test scales its own count by it).
try:
    import os as _os

    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci",
        derandomize=True,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile("long", parent=settings.get_profile("ci"))
    settings.load_profile(_os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover - hypothesis is in requirements.txt
    pass
