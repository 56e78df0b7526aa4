"""The pinned requirement sets resolve from the public registries alone and are complete.

Each set is resolved as an isolated pip dry run (no PIP_* variables, no configuration file, no
local wheel folder: what a user's machine has) of the files the setup or an image installs
together (scripts/pins.py). A set fails when a pin does not resolve there, or when a resolved
wheel requires something the set does not hold, as PyPI's CUDA torch does of its CUDA libraries.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from scripts.pins import (
    INSTALL_SETS,
    TORCH_CPU_INDEX,
    ResolutionError,
    index_problem,
    pins,
    requirement_file,
    resolve,
    unhashed_lines,
    unmet,
)

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted({name for files in INSTALL_SETS.values() for name in files})


def needs_cpu_index(files: tuple[str, ...]) -> bool:
    """Whether a set pins a torch that only PyTorch's CPU index serves (a ``+cpu`` local version)."""
    return any("+" in version for name in files for package, version in pins(requirement_file(name)))


@pytest.fixture(scope="module")
def cpu_index_problem() -> str | None:
    return index_problem(TORCH_CPU_INDEX)


@pytest.fixture(scope="module")
def outcomes(cpu_index_problem: str | None) -> dict[str, list[str] | str]:
    """Each set's unmet requirements, or why it did not resolve; resolved in parallel."""

    def outcome(files: tuple[str, ...]) -> list[str] | str:
        if needs_cpu_index(files) and cpu_index_problem:
            return []
        try:
            return unmet(resolve(files, cpu_index=needs_cpu_index(files)))
        except ResolutionError as error:
            return str(error)

    with ThreadPoolExecutor(max_workers=len(INSTALL_SETS)) as pool:
        return dict(zip(INSTALL_SETS, pool.map(outcome, INSTALL_SETS.values()), strict=True))


@pytest.mark.parametrize("label", list(INSTALL_SETS))
def test_each_set_resolves_from_the_public_registries_and_is_complete(label, outcomes, cpu_index_problem):
    if needs_cpu_index(INSTALL_SETS[label]) and cpu_index_problem:
        pytest.skip(f"PyTorch's CPU index cannot be reached from here ({cpu_index_problem})")
    outcome = outcomes[label]
    assert isinstance(outcome, list), f"{label}: does not resolve from PyPI alone: {outcome}"
    assert outcome == [], f"{label}: requirements the set leaves out:\n" + "\n".join(outcome)


@pytest.mark.parametrize("name", FILES)
def test_every_pin_carries_its_hash(name):
    assert unhashed_lines(requirement_file(name)) == []


@pytest.mark.parametrize("path", ["Makefile", "Dockerfile.cpu", "Dockerfile.gpu"])
def test_every_install_of_a_requirement_file_checks_the_hashes(path):
    """A file changed on an index, or another index offering the same name, fails the install."""
    text = (ROOT / path).read_text().replace("\\\n", " ")
    installs = [line for line in text.splitlines() if "pip" in line and " install" in line and "-r" in line]
    assert installs, f"{path} installs no requirement file"
    for line in installs:
        assert "--require-hashes" in line and "--no-deps" in line, f"{path}: {line.strip()}"
