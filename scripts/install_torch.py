"""Install torch 2.13.0 into the running Python's environment: the CPU build where it can be had,
else PyPI's build, which imports everywhere once its CUDA libraries are installed too.

The first of these that works is taken, and the choice is printed:
1. ``TORCH_WHEELS``: a local folder holding ``torch-2.13.0+cpu`` (an offline machine's copy);
2. pip's own configuration (an index or ``find-links`` of the user's that serves ``2.13.0+cpu``);
3. PyTorch's CPU index (``TORCH_CPU_INDEX``), asked once with a 5 s limit;
4. PyPI's ``torch==2.13.0``, the CUDA 13 build, with the CUDA libraries it requires
   (``requirements/torch-gpu.txt``: about 3.5 GB to download instead of 0.2 GB).

Every file is checked against its pinned hash (``--require-hashes``), wherever it comes from.
Run by ``make setup`` with the virtual environment's Python: ``python -m scripts.install_torch``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from scripts.pins import TORCH_CPU_INDEX, index_problem, pins, requirement_file


@dataclass(frozen=True)
class TorchSource:
    """Which torch requirement file to install, from where, and the line that says so."""

    description: str
    requirements: str
    pip_sources: tuple[str, ...] = ()


def cpu_torch_pin() -> str:
    """``torch==2.13.0+cpu``, as requirements/torch-cpu.txt pins it."""
    version = dict(pins(requirement_file("torch-cpu")))["torch"]
    return f"torch=={version}"


def pip_provides(requirement: str) -> bool:
    """Whether pip, as this machine configures it, finds ``requirement`` (a quick dry run)."""
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet"]
    command += ["--retries", "0", "--timeout", "5", requirement]
    return subprocess.run(command, capture_output=True).returncode == 0


def choose(environ: dict[str, str]) -> TorchSource:
    """The first source of a torch that imports here (see the module docstring)."""
    wheels = environ.get("TORCH_WHEELS", "")
    if wheels:
        if not Path(wheels).is_dir():
            raise SystemExit(f"TORCH_WHEELS must be a folder of wheels, got {wheels!r}")
        return TorchSource(f"the CPU build from TORCH_WHEELS={wheels}", "torch-cpu", ("--find-links", wheels))
    if pip_provides(cpu_torch_pin()):
        return TorchSource("the CPU build, which pip's own configuration provides", "torch-cpu")
    index = environ.get("TORCH_CPU_INDEX", TORCH_CPU_INDEX)
    problem = index_problem(index)
    if problem is None:
        return TorchSource(f"the CPU build from PyTorch's CPU index {index}", "torch-cpu", ("--extra-index-url", index))
    return TorchSource(
        f"PyPI's build with the CUDA libraries it requires (about 3.5 GB): PyTorch's CPU index {index} "
        f"cannot be reached ({problem}); a folder holding the CPU wheel can be given as TORCH_WHEELS",
        "torch-gpu",
    )


def main() -> int:
    """Choose, print the choice, install."""
    source = choose(dict(os.environ))
    print(f"[setup] torch: {source.description}", flush=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--require-hashes"]
    command += [*source.pip_sources, "-r", str(requirement_file(source.requirements))]
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
