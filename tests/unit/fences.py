"""Helpers for the tests of the patches' fences (services/common/startup/patching.py)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable

import pytest

from services.common.startup import patching
from services.common.startup.patching import PatchError

REAL_VERSION = importlib.metadata.version
WRONG = "0.0.1"


def pretend_version(monkeypatch: pytest.MonkeyPatch, dist: str, found: str = WRONG) -> None:
    """``importlib.metadata.version`` answers ``found`` for ``dist`` (the truth for the rest)."""
    monkeypatch.setattr(
        patching.importlib.metadata, "version", lambda name: found if name == dist else REAL_VERSION(name)
    )


def refusal(patch: str, dist: str, version: str, found: str = WRONG) -> str:
    """The one line a fence raises for ``dist`` at ``found`` instead of ``version``."""
    return f"{patch} patches {dist} {version}, found {found}; see docs/patches.md"


def assert_refused(call: Callable[[], object], message: str) -> None:
    """``call()`` raises PatchError with exactly ``message``, on one line."""
    with pytest.raises(PatchError) as refused:
        call()
    assert str(refused.value) == message
    assert "\n" not in message
