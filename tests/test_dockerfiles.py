"""The Dockerfiles: hadolint-clean, consistent with the files CI installs, torch-free ui and gateway."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.pins import pins, requirement_file
from services.swarm.image_models import IMAGE_DIR, STAGE_DIR

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "Dockerfile.cpu", ROOT / "Dockerfile.gpu"]
HADOLINT = Path(sys.executable).with_name("hadolint")


def test_hadolint_is_clean():
    result = subprocess.run([HADOLINT, "--no-color", *DOCKERFILES], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# Made before the build by `python -m services.swarm.image_models` (scripts/build_images.sh), not in git.
STAGED_MODELS = STAGE_DIR.relative_to(ROOT).as_posix() + "/"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists(dockerfile: Path):
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _ = line.split()[1:]
            for source in sources:
                if source == STAGED_MODELS:
                    continue
                assert (ROOT / source).exists(), f"{dockerfile.name}: {source} does not exist"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_inference_and_swarm_images_embed_the_staged_models(dockerfile: Path):
    for target in ("inference", "swarm"):
        assert f"COPY {STAGED_MODELS} {IMAGE_DIR}/\n" in stage(dockerfile, target), f"{dockerfile.name}: {target}"
    assert 'ENTRYPOINT ["python", "-m", "services.swarm.serve"]' in stage(dockerfile, "swarm")
    if dockerfile.name == "Dockerfile.cpu":
        for target in ("ui", "gateway"):
            assert IMAGE_DIR not in stage(dockerfile, target)


def test_images_install_the_requirement_files_ci_installs():
    makefile = (ROOT / "Makefile").read_text()
    ci_files = set()
    for variable in ("REQUIREMENTS :=", "TORCH_REQUIREMENTS :="):
        ci_files |= set(re.findall(r"requirements/[\w-]+\.txt", makefile.split(variable)[1].splitlines()[0]))
    for dockerfile in DOCKERFILES:
        used = set(re.findall(r"requirements/[\w-]+\.txt", dockerfile.read_text()))
        assert used <= ci_files, f"{dockerfile.name} installs files CI never installs: {used - ci_files}"


def stage(dockerfile: Path, name: str) -> str:
    text = dockerfile.read_text()
    match = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"{dockerfile.name} has no stage {name}"
    return match.group(1)


def test_ui_and_gateway_images_carry_no_torch():
    deps = stage(DOCKERFILES[0], "web-deps")
    assert "torch" not in deps and "petals" not in deps
    for target in ("ui", "gateway"):
        assert "--from=web-deps" in stage(DOCKERFILES[0], target)


@pytest.mark.parametrize("module", ["services.ui.app", "services.gateway.app"])
def test_ui_and_gateway_code_never_imports_torch(module: str):
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'petals', 'transformers', 'hivemind'):\n"
        "            raise ImportError(f'{name} must not be imported here')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"import {module}\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_build_context_keeps_host_state_out():
    """.dockerignore (read by docker build and by buildah bud in scripts/build_images.sh): host
    bytecode, tool caches, venvs, the image cache, git and test output never reach an image; the
    staged models (the one thing under .cache the Dockerfiles COPY) do."""
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    for junk in [".git", ".venv", ".venv-*", "test-artifacts", "**/__pycache__", "**/*.py[cod]"]:
        assert junk in patterns, junk
    for cache in [".pytest_cache", ".ruff_cache"]:
        assert f"**/{cache}" in patterns, cache
    assert patterns.index(".cache/*") < patterns.index("!" + STAGED_MODELS.rstrip("/"))


def test_gpu_builds_never_use_the_cpu_wheels_folder():
    """TORCH_WHEELS holds torch 2.13.0+cpu, which `torch==2.13.0` accepts: the GPU targets get neither
    that folder nor its find-links (scripts/build_images.sh)."""
    script = (ROOT / "scripts" / "build_images.sh").read_text()
    gpu_mounts = re.search(r"^GPU_MOUNTS=\((.*)\)$", script, re.MULTILINE)[1]
    assert "host-wheels" not in gpu_mounts and "pip-gpu.conf" in gpu_mounts
    assert script.index('cp "$CACHE/pip.conf" "$CACHE/pip-gpu.conf"') < script.index("find-links = /host-wheels")
    gpu_branch = script[script.index('if [[ "$t" == *-gpu ]]; then') :].split("fi\n", 1)[0]
    assert 'mounts=("${GPU_MOUNTS[@]}")' in gpu_branch and 'args=("${gpu_build_args[@]}")' in gpu_branch


def public_pins(name: str) -> dict[str, str]:
    """A requirement file's pins, names lower-cased, versions without a local label (``+cpu``)."""
    return {package.lower(): version.split("+")[0] for package, version in pins(requirement_file(name))}


def test_the_gpu_torch_set_pins_the_cpu_sets_versions():
    cpu, gpu = public_pins("torch-cpu"), public_pins("torch-gpu")
    assert {name: gpu.get(name) for name in cpu} == cpu  # torch and its pure-Python dependencies alike
