"""Building a cached model directory so that no reader ever sees half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(staging)`` in a fresh folder beside ``target``, then rename it to ``target``.

    The rename is atomic: concurrent builders never see half a model, and one that loses the race
    keeps the winner's directory (which has its config.json).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    staging.chmod(0o755)
    try:
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
