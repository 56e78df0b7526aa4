"""Registers the ``slow`` marker for the image tests (pyproject's marker list stays as it is)."""

from __future__ import annotations


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: builds real container images (minutes); runs only with RUN_SLOW_TESTS=1")
