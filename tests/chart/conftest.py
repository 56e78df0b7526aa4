"""The chart, loaded once per test module (helm-python-sdk: Helm's Go SDK, no helm binary)."""

from __future__ import annotations

from pathlib import Path

import helm_python
import pytest

CHART = Path(__file__).resolve().parents[2] / "charts" / "petals-chat"


@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(str(CHART)) as loaded:
        yield loaded
