"""bitsandbytes 0.41.1 (Petals' pin) on a triton without ``triton.ops``: the patch, fenced here.

Whenever triton is installed, bitsandbytes 0.41.1 imports ``triton.ops.matmul_perf_model`` as it
loads (its SwitchBack 8-bit layers). triton 3 has no ``triton.ops``, and PyPI's torch 2.13.0 (the
CUDA build: the GPU images, and the local setup where torch's CPU build cannot be had) brings
triton 3.7.1. So ``import bitsandbytes`` fails, and with it every Petals server, whose blocks
import it through ``petals.utils.peft`` ("No module named 'triton.ops'").

bitsandbytes asks ``bitsandbytes.triton.triton_utils.is_triton_available()`` before touching
triton, and defines triton-free stand-ins otherwise. ``install()`` puts a module whose
``is_triton_available()`` is False in that module's place before bitsandbytes loads, when triton
lacks ``triton.ops``. Saves: a Petals server that starts at all with the CUDA torch. Petals uses
none of the SwitchBack layers. Can go with a bitsandbytes that no longer imports ``triton.ops``.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

from services.common.startup.patching import PatchError, require_version

PATCH = "bitsandbytes_triton"
PATCHED_VERSION = "0.41.1"
PATCHED_MODULE = "bitsandbytes.triton.triton_utils"


def needed() -> bool:
    """Whether triton is installed without ``triton.ops`` (the case bitsandbytes 0.41.1 breaks on)."""
    return importlib.util.find_spec("triton") is not None and importlib.util.find_spec("triton.ops") is None


def check() -> None:
    """Raise PatchError unless bitsandbytes is 0.41.1 and its ``PATCHED_MODULE`` defines
    ``is_triton_available`` (read from its source: importing it is what fails)."""
    require_version("bitsandbytes", PATCHED_VERSION, PATCH)
    spec = importlib.util.find_spec("bitsandbytes")  # the package's location; imports nothing
    source = Path(spec.submodule_search_locations[0], "triton", "triton_utils.py") if spec else None
    if source is None or "def is_triton_available(" not in _read(source):
        raise PatchError(PATCH, f"{PATCHED_MODULE}.is_triton_available, which is missing")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def install() -> None:
    """Make bitsandbytes take its triton-free path where its triton path cannot import; must run
    before anything imports bitsandbytes. Raises PatchError (``check``) where it does not fit."""
    if not needed():
        return
    check()
    if "bitsandbytes" in sys.modules:
        raise RuntimeError("bitsandbytes_triton.install() must run before bitsandbytes is imported")
    stand_in = types.ModuleType(PATCHED_MODULE)
    stand_in.is_triton_available = lambda: False
    sys.modules[PATCHED_MODULE] = stand_in
