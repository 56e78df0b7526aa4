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

import importlib.metadata
import importlib.util
import sys
import types

PATCHED_VERSION = "0.41.1"
PATCHED_MODULE = "bitsandbytes.triton.triton_utils"


def needed() -> bool:
    """Whether triton is installed without ``triton.ops`` (the case bitsandbytes 0.41.1 breaks on)."""
    return importlib.util.find_spec("triton") is not None and importlib.util.find_spec("triton.ops") is None


def install() -> None:
    """Make bitsandbytes take its triton-free path where its triton path cannot import; must run
    before anything imports bitsandbytes. Raises RuntimeError for another bitsandbytes version."""
    if not needed():
        return
    version = importlib.metadata.version("bitsandbytes")
    if version != PATCHED_VERSION:
        raise RuntimeError(
            f"services/swarm/bitsandbytes_triton.py patches bitsandbytes {PATCHED_VERSION}, not {version}"
        )
    if "bitsandbytes" in sys.modules:
        raise RuntimeError("bitsandbytes_triton.install() must run before bitsandbytes is imported")
    stand_in = types.ModuleType(PATCHED_MODULE)
    stand_in.is_triton_available = lambda: False
    sys.modules[PATCHED_MODULE] = stand_in
