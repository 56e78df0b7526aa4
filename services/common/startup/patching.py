"""Fences for the patches of third-party internals (docs/patches.md lists them).

Each patch module checks, before it patches, the exact version of the library it was written
against and that what it replaces is there in the shape it expects; anything else stops the
process at start-up with one line (``PatchError``) instead of un-patching or breaking silently.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Iterable
from typing import Any

DOCS = "docs/patches.md"


class PatchError(RuntimeError):
    """A patch does not fit the library installed: its one-line message says which and why."""

    def __init__(self, patch: str, problem: str) -> None:
        super().__init__(f"{patch} patches {problem}; see {DOCS}")


def require_version(dist: str, version: str, patch: str) -> None:
    """Raise PatchError unless the installed distribution ``dist`` is exactly ``version``."""
    try:
        found = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        found = "none installed"
    if found != version:
        raise PatchError(patch, f"{dist} {version}, found {found}")


def require_attributes(obj: Any, names: Iterable[str], patch: str) -> None:
    """Raise PatchError unless ``obj`` (a module or class) has every attribute in ``names``."""
    missing = [name for name in names if not hasattr(obj, name)]
    if missing:
        raise PatchError(patch, f"{_name(obj)}.{missing[0]}, which is missing")


def require_parameters(function: Any, names: Iterable[str], patch: str) -> None:
    """Raise PatchError unless ``function``'s first parameters are ``names``, in that order."""
    expected = list(names)
    found = list(inspect.signature(function).parameters)[: len(expected)]
    if found != expected:
        shown = f"{_name(function)}({', '.join(expected)})"
        raise PatchError(patch, f"{shown}, found parameters ({', '.join(found)})")


def require_methods(cls: type, methods: dict[str, tuple[str, ...]], patch: str) -> None:
    """Raise PatchError unless ``cls`` has each method of ``methods`` with those first parameters."""
    require_attributes(cls, methods, patch)
    for name, parameters in methods.items():
        require_parameters(getattr(cls, name), parameters, patch)


def _name(obj: Any) -> str:
    if inspect.ismodule(obj):
        return obj.__name__
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
