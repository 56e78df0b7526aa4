"""The pinned requirement sets: which files are installed together, and checks that each set
resolves from the public registries alone and is complete.

Every file in ``requirements/`` is a full closure of exact pins, each with its ``--hash``, and
is installed with ``pip install --no-deps --require-hashes`` (the setup and the images alike).
So pip never resolves dependencies at install time; these checks do it instead, once, in an
isolated pip (no ``PIP_*`` variables, no configuration file, no local wheel folder):

- ``resolve`` runs an isolated ``pip install --dry-run --no-deps --report`` of a set against
  PyPI (and PyTorch's CPU index for the CPU torch), reading each wheel's metadata with HTTP range
  requests (pip's ``fast-deps``: a few MB instead of the CUDA wheels' 3.5 GB);
- ``unmet`` lists what a resolved set requires (markers evaluated for Linux x86-64, CPython 3.11)
  that the set does not hold, less petals' own stale pins (``PETALS_STALE_PINS``).

``python -m scripts.pins hash FILE...`` writes each pin's hash from that same resolution (run it
after changing a pin; the CPU torch's hash comes from ``TORCH_WHEELS`` or the CPU index).
``python -m scripts.pins check`` resolves every set and prints what is missing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPI_INDEX = "https://pypi.org/simple"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PROBE_SECONDS = 5

# Which files are installed together, by whom. The setup installs one torch file (the CPU build,
# or PyPI's CUDA build where the CPU build cannot be had: scripts/install_torch.py) with the rest.
INSTALL_SETS: dict[str, tuple[str, ...]] = {
    "setup, CPU torch": ("pip", "torch-cpu", "web", "gateway", "petals", "dev"),
    "setup, PyPI's CUDA torch": ("pip", "torch-gpu", "web", "gateway", "petals", "dev"),
    "images: ui, gateway": ("web", "gateway"),
    "images: inference, swarm (CPU)": ("torch-cpu", "web", "petals"),
    "images: inference, swarm (GPU)": ("torch-gpu", "web", "petals"),
    "checkov": ("checkov",),
}
TORCH_CPU_FILES = frozenset({"torch-cpu"})

# petals 2.2.0.post1's metadata pins versions that cannot be installed on Python 3.11 today
# (hivemind's sdist needs the internet to build; pydantic<2 breaks hivemind 1.1.11); the
# verified set replaces them (docs/setup.md, Dependencies). `pip check` tolerates the same two.
PETALS_STALE_PINS = frozenset({("petals", "hivemind"), ("petals", "pydantic")})

# The platform every set is for: the setup's and the images' (Linux x86-64, CPython 3.11).
TARGET_MARKERS = default_environment() | {
    "implementation_name": "cpython",
    "platform_machine": "x86_64",
    "platform_system": "Linux",
    "python_version": "3.11",
    "python_full_version": "3.11.7",
    "sys_platform": "linux",
    "os_name": "posix",
    "platform_python_implementation": "CPython",
    "extra": "",
}

_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==(\S+)")


@dataclass(frozen=True)
class Resolved:
    """One pin as pip resolved it: the file it would install and what that file requires."""

    name: str
    version: str
    sha256: str
    requires: tuple[str, ...]


def requirement_file(name: str) -> Path:
    """``requirements/<name>.txt``."""
    return ROOT / "requirements" / f"{name}.txt"


def pins(path: Path) -> list[tuple[str, str]]:
    """The ``(name, version)`` pins of a requirement file, in order."""
    found = []
    for line in path.read_text().splitlines():
        match = _PIN.match(line.strip())
        if match:
            found.append((match.group(1), match.group(2)))
    return found


def index_problem(url: str, timeout: float = PROBE_SECONDS) -> str | None:
    """Why an index cannot be used now (unreachable, an error status), or None when it answers."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=timeout) as answer:
            return None if answer.status == 200 else f"HTTP {answer.status}"
    except (urllib.error.URLError, OSError) as error:
        return str(getattr(error, "reason", error))


def isolated_pip(python: str = sys.executable) -> list[str]:
    """pip ignoring this machine's configuration: no PIP_* variables, no configuration file."""
    return [python, "-m", "pip", "--isolated", "--disable-pip-version-check"]


def resolve(files: Iterable[str], *, find_links: str | None = None, cpu_index: bool = False) -> list[Resolved]:
    """Resolve requirement files (names under requirements/) together, as an isolated dry run of
    ``pip install --no-deps`` against PyPI (and PyTorch's CPU index when ``cpu_index``)."""
    sources = ["--index-url", PYPI_INDEX]
    if cpu_index:
        sources += ["--extra-index-url", TORCH_CPU_INDEX]
    if find_links:
        sources += ["--find-links", find_links]
    args = [a for name in files for a in ("-r", str(requirement_file(name)))]
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        command = [*isolated_pip(), "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet"]
        command += ["--use-feature=fast-deps", "--timeout", "30", "--report", str(report), *sources, *args]
        done = subprocess.run(command, capture_output=True, text=True, env=_without_pip_variables())
        if done.returncode != 0:
            raise ResolutionError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "pip failed")
        return [_resolved(item) for item in json.loads(report.read_text())["install"]]


class ResolutionError(Exception):
    """A requirement set does not resolve (pip's last line says why)."""


def _resolved(item: dict) -> Resolved:
    metadata = item["metadata"]
    hashes = item["download_info"].get("archive_info", {}).get("hashes", {})
    return Resolved(
        name=canonicalize_name(metadata["name"]),
        version=metadata["version"],
        sha256=hashes.get("sha256", ""),
        requires=tuple(metadata.get("requires_dist", [])),
    )


def _without_pip_variables() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}


def unmet(resolved: Sequence[Resolved]) -> list[str]:
    """What the resolved set requires (for the target platform, with the extras the set asks of
    each package) and does not hold: ``"<package> requires <requirement> (set has ...)"`` lines."""
    held = {item.name: Version(item.version) for item in resolved}
    extras = _requested_extras(resolved)
    problems = []
    for item in resolved:
        for text in item.requires:
            requirement = Requirement(text)
            name = canonicalize_name(requirement.name)
            if not _applies(requirement, extras.get(item.name, set())) or (item.name, name) in PETALS_STALE_PINS:
                continue
            version = held.get(name)
            if version is None or not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{item.name} requires {text} (set has {version or 'nothing'})")
    return problems


def _requested_extras(resolved: Sequence[Resolved]) -> dict[str, set[str]]:
    """The extras that the set's packages ask of each other (``cuda-toolkit[cublas,...]``)."""
    extras: dict[str, set[str]] = {}
    for item in resolved:
        for text in item.requires:
            requirement = Requirement(text)
            if requirement.extras and _applies(requirement, set()):
                extras.setdefault(canonicalize_name(requirement.name), set()).update(requirement.extras)
    return extras


def _applies(requirement: Requirement, extras: set[str]) -> bool:
    """Whether a requirement holds on the target platform, with no extra or one of ``extras``."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate(TARGET_MARKERS | {"extra": extra}) for extra in {"", *extras})


def unhashed_lines(path: Path) -> list[str]:
    """Requirement lines of a file that are not an exact pin carrying a ``--hash``."""
    bad = []
    for line in _requirement_lines(path):
        if not _PIN.match(line) or "--hash=sha256:" not in line:
            bad.append(line)
    return bad


def _requirement_lines(path: Path) -> list[str]:
    """A file's requirement lines, continuation lines joined, comments and blanks dropped."""
    joined = path.read_text().replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def write_hashes(path: Path, resolved: Sequence[Resolved]) -> None:
    """Rewrite a requirement file's pins as ``name==version --hash=sha256:...`` (comments kept)."""
    by_name = {item.name: item for item in resolved}
    lines = []
    for line in path.read_text().replace("\\\n", " ").splitlines():
        match = _PIN.match(line.strip())
        if match:
            item = by_name[canonicalize_name(match.group(1))]
            line = f"{match.group(1)}=={match.group(2)} \\\n    --hash=sha256:{item.sha256}"
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")


def _sources_for(files: Sequence[str]) -> dict:
    """Where a set's torch comes from: the CPU index (when it answers) or TORCH_WHEELS."""
    if not TORCH_CPU_FILES & set(files):
        return {}
    wheels = os.environ.get("TORCH_WHEELS") or None
    return {"find_links": wheels, "cpu_index": index_problem(TORCH_CPU_INDEX) is None}


def main(argv: Sequence[str]) -> int:
    """``hash FILE...`` or ``check``."""
    if argv[:1] == ["hash"] and len(argv) > 1:
        for name in argv[1:]:
            write_hashes(requirement_file(name), resolve([name], **_sources_for([name])))
            print(f"hashed requirements/{name}.txt")
        return 0
    if argv == ["check"]:
        failed = False
        for label, files in INSTALL_SETS.items():
            try:
                problems = unmet(resolve(files, **_sources_for(files)))
            except ResolutionError as error:
                problems = [f"does not resolve: {error}"]
            failed |= bool(problems)
            print(f"{label}: " + ("complete" if not problems else "\n  " + "\n  ".join(problems)))
        return 1 if failed else 0
    print("usage: python -m scripts.pins hash FILE... | check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
