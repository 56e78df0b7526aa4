"""services/common/startup/patching.py: the fences' checks, and their one-line messages."""

from __future__ import annotations

import types

import pytest

from services.common.startup import patching
from services.common.startup.patching import (
    PatchError,
    require_attributes,
    require_methods,
    require_parameters,
    require_version,
)


def test_the_exact_version_passes():
    require_version("pytest", pytest.__version__, "a_patch")


@pytest.mark.parametrize(
    ("found", "shown"), [("8.0.0", "found 8.0.0"), (None, "found none installed")], ids=["another", "absent"]
)
def test_another_or_no_version_is_refused_in_one_line(monkeypatch, found, shown):
    def version(dist: str) -> str:
        if found is None:
            raise patching.importlib.metadata.PackageNotFoundError(dist)
        return found

    monkeypatch.setattr(patching.importlib.metadata, "version", version)
    with pytest.raises(PatchError) as refused:
        require_version("somelib", "1.2.3", "a_patch")
    assert str(refused.value) == f"a_patch patches somelib 1.2.3, {shown}; see docs/patches.md"
    assert isinstance(refused.value, RuntimeError)


def test_a_missing_attribute_is_named():
    module = types.ModuleType("somelib.part")
    module.present = 1
    require_attributes(module, ["present"], "a_patch")
    with pytest.raises(
        PatchError, match=r"^a_patch patches somelib\.part\.absent, which is missing; see docs/patches\.md$"
    ):
        require_attributes(module, ["present", "absent"], "a_patch")


def test_parameters_are_checked_in_order_as_a_prefix():
    def function(tensor, compression_type=0, *args, **kwargs): ...

    require_parameters(function, ["tensor", "compression_type"], "a_patch")
    with pytest.raises(
        PatchError, match=r"function\(tensor, compression\), found parameters \(tensor, compression_type\)"
    ):
        require_parameters(function, ["tensor", "compression"], "a_patch")


def test_methods_are_checked_by_name_and_parameters():
    class Base:
        def handle(self, conn): ...

    require_methods(Base, {"handle": ("self", "conn")}, "a_patch")
    with pytest.raises(PatchError, match=r"Base\.handle\(self, req\)"):
        require_methods(Base, {"handle": ("self", "req")}, "a_patch")
    with pytest.raises(PatchError, match=r"Base\.accept, which is missing"):
        require_methods(Base, {"accept": ("self",)}, "a_patch")
