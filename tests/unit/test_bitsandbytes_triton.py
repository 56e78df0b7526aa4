"""bitsandbytes 0.41.1 loads next to a triton without ``triton.ops`` once the patch is installed.

A stand-in ``triton`` package (no ``ops``) plays triton 3 here, where the CPU torch brings no
triton; the real one is exercised by ``make test-clean-setup`` on PyPI's CUDA torch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_with_triton_3(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    (tmp_path / "triton" / "language").mkdir(parents=True)
    (tmp_path / "triton" / "__init__.py").write_text("__version__ = '3.7.1'\n")
    (tmp_path / "triton" / "language" / "__init__.py").write_text("")
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)


def test_without_the_patch_bitsandbytes_fails_on_triton_3(tmp_path):
    result = run_with_triton_3(tmp_path, "import bitsandbytes")
    assert result.returncode != 0 and "No module named 'triton.ops'" in result.stderr


def test_with_the_patch_bitsandbytes_and_petals_blocks_load(tmp_path):
    code = (
        "from services.swarm import bitsandbytes_triton\n"
        "assert bitsandbytes_triton.needed()\n"
        "bitsandbytes_triton.install()\n"
        "import bitsandbytes, petals.utils.peft\n"
        "print(bitsandbytes.nn.Linear8bitLt.__name__)\n"
    )
    result = run_with_triton_3(tmp_path, code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("Linear8bitLt")


def test_where_triton_is_absent_or_has_ops_nothing_is_patched(monkeypatch):
    from services.swarm import bitsandbytes_triton

    monkeypatch.setattr(bitsandbytes_triton, "needed", lambda: False)
    before = dict(sys.modules)
    bitsandbytes_triton.install()
    assert bitsandbytes_triton.PATCHED_MODULE not in set(sys.modules) - set(before)


def test_another_bitsandbytes_version_is_refused(monkeypatch):
    from services.swarm import bitsandbytes_triton

    monkeypatch.setattr(bitsandbytes_triton, "needed", lambda: True)
    monkeypatch.setattr(bitsandbytes_triton.importlib.metadata, "version", lambda name: "0.45.0")
    with pytest.raises(RuntimeError, match=r"patches bitsandbytes 0\.41\.1, found 0\.45\.0; see docs/patches\.md"):
        bitsandbytes_triton.install()
