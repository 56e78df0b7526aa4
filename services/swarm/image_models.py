"""The models the inference and swarm images embed, staged in the build context.

``scripts/build_images.sh`` runs ``python -m services.swarm.image_models`` before building the
inference and swarm images; Dockerfile.cpu and Dockerfile.gpu then ``COPY .cache/image-models/
/models/``. Each model is built (or taken from the cache) by its own offline builder, the same
code the tests and ``make run`` use, and copied under a stable name:

- ``/models/smollm2-135m-instruct``: SmolLM2-135M-Instruct, float32 (services/swarm/smollm2.py);
- ``/models/tiny-bloom``: the tiny deterministic BLOOM (services/swarm/tiny_bloom.py).

The staged copy is deterministic: the builders write the same bytes on every build, and here every
file gets mode 0644 (safetensors writes 0600: the images run as uid 10001), every folder 0755, and
one fixed modification time, so the image layer only changes when a model does. Building the
models on the host rather than in the image keeps the image build free of model downloads and
gives the CPU and GPU images the very same bytes (no CUDA torch needed to build them).
"""

from __future__ import annotations

import filecmp
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from services.swarm.tiny_bloom import DEFAULT_CACHE_DIR, ensure_tiny_bloom

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGE_DIR = REPO_ROOT / ".cache" / "image-models"  # the Dockerfiles COPY exactly this folder
IMAGE_DIR = "/models"  # where the images carry them
FIXED_MTIME = 1_700_000_000  # 2023-11-14: every staged file and folder


def _smollm2(cache_dir: Path) -> Path:
    from services.swarm.smollm2 import ensure_smollm2

    return ensure_smollm2(cache_dir)


EMBEDDED: dict[str, Callable[[Path], Path]] = {
    "smollm2-135m-instruct": _smollm2,
    "tiny-bloom": ensure_tiny_bloom,
}


def _same_tree(source: Path, target: Path) -> bool:
    if not target.is_dir():
        return False
    names = sorted(p.name for p in source.iterdir())
    if names != sorted(p.name for p in target.iterdir()):
        return False
    for name in names:
        staged = target / name
        if staged.stat().st_mode & 0o777 != 0o644 or int(staged.stat().st_mtime) != FIXED_MTIME:
            return False
        if not filecmp.cmp(source / name, staged, shallow=False):
            return False
    return True


def stage_model(source: Path, target: Path) -> bool:
    """Copy the model folder ``source`` to ``target`` (normalised modes and times); False: already there."""
    if _same_tree(source, target):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for path in sorted(source.iterdir()):
            if not path.is_file():
                raise OSError(f"{path}: a model folder holds files only")
            shutil.copyfile(path, staging / path.name)
            os.chmod(staging / path.name, 0o644)
            os.utime(staging / path.name, (FIXED_MTIME, FIXED_MTIME))
        staging.chmod(0o755)
        os.utime(staging, (FIXED_MTIME, FIXED_MTIME))
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def stage_all(destination: Path = STAGE_DIR, cache_dir: Path = DEFAULT_CACHE_DIR) -> dict[str, Path]:
    """Build (or reuse) every embedded model and stage it in ``destination``; name -> staged folder."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    destination.chmod(0o755)
    staged = {}
    for name, ensure in EMBEDDED.items():
        stage_model(ensure(Path(cache_dir)), destination / name)
        staged[name] = destination / name
    for extra in destination.iterdir():  # a model no longer embedded must not stay in the images
        if extra.name not in EMBEDDED:
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    os.utime(destination, (FIXED_MTIME, FIXED_MTIME))
    return staged


def main(argv: list[str]) -> int:
    """CLI: stage every embedded model (in argv[0] or .cache/image-models), print the folders."""
    from services.swarm.smollm2 import ModelBuildError

    try:
        for path in stage_all(Path(argv[0]) if argv else STAGE_DIR).values():
            print(path)
    except (ModelBuildError, OSError) as error:
        print(f"image_models: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
