"""The CPU images build for real and their services answer HTTP from inside the image.

scripts/build_images.sh builds ``petals-chat-ui`` and ``petals-chat-gateway`` from Dockerfile.cpu
with buildah (overlay storage, chroot isolation) on a local debootstrap Debian base. Each image is then
started with ``buildah from`` + ``buildah run``: a small probe inside the container starts the
image's gunicorn on a loopback port and GETs the given paths (chroot isolation shares the host's
network, the probe keeps the server's whole life inside the one ``buildah run``).

Slow (about 6 minutes from a cold cache, 3 with a warm one) and needs root: kept out of the default
run, enabled with ``RUN_SLOW_TESTS=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_images.sh"
CACHE = ROOT / ".cache" / "images"
BUILDAH = [
    "buildah", "--root", str(CACHE / "storage-overlay"), "--runroot", str(CACHE / "run"), "--storage-driver", "overlay",
]  # fmt: skip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(2400),
    pytest.mark.skipif(os.environ.get("RUN_SLOW_TESTS") != "1", reason="slow image build: set RUN_SLOW_TESTS=1"),
    pytest.mark.skipif(
        hasattr(os, "geteuid") and os.geteuid() != 0, reason="buildah with chroot isolation and debootstrap need root"
    ),
    pytest.mark.skipif(shutil.which("apt-get") is None and shutil.which("buildah") is None, reason="no buildah"),
]

# Runs inside the image with the image's own python: starts its gunicorn, GETs each path until it
# answers (or 60 s pass), stops gunicorn, prints one JSON line.
PROBE = r"""
import json, os, subprocess, sys, time, urllib.request
port, paths = sys.argv[1], sys.argv[2:]
env = dict(os.environ, BIND="127.0.0.1:" + port)
proc = subprocess.Popen(["gunicorn", "--config", os.environ["GUNICORN_CONF"]], env=env)
out = {}
try:
    deadline = time.time() + 60
    for path in paths:
        while True:
            try:
                with urllib.request.urlopen("http://127.0.0.1:" + port + path, timeout=5) as r:
                    out[path] = {"status": r.status, "body": r.read(100000).decode("utf-8", "replace")}
                break
            except Exception as e:
                if time.time() > deadline or proc.poll() is not None:
                    out[path] = {"error": repr(e)}
                    break
                time.sleep(0.5)
finally:
    proc.terminate()
    proc.wait(timeout=30)
print("PROBE " + json.dumps(out), flush=True)
"""


# Host state planted in the build context before the build: what a developer's runs leave behind
# (this machine's environment sets PYTHONDONTWRITEBYTECODE, so its own runs write no bytecode).
# .dockerignore must keep every one of them out of the images.
PLANTED = [
    "services/__pycache__/planted.cpython-311.pyc",
    "services/common/__pycache__/planted.cpython-311.pyc",
    "services/ui/planted.pyc",
    "services/gateway/.pytest_cache/planted",
    "services/common/.ruff_cache/planted",
    "services/.venv/planted",
]


@pytest.fixture(scope="module")
def built_images() -> None:
    planted = [ROOT / path for path in PLANTED if not (ROOT / path).exists()]
    made_dirs = []
    try:
        for path in planted:
            for parent in reversed(path.parents):
                if not parent.exists():
                    parent.mkdir()
                    made_dirs.append(parent)
            path.write_bytes(b"host junk")
        result = subprocess.run(
            ["bash", str(SCRIPT), "ui", "gateway"], cwd=ROOT, capture_output=True, text=True, timeout=2100
        )
    finally:
        for path in planted:
            path.unlink(missing_ok=True)
        for folder in reversed(made_dirs):
            shutil.rmtree(folder, ignore_errors=True)
    assert result.returncode == 0, f"build failed ({result.returncode}):\n{result.stderr[-6000:]}"


@pytest.mark.parametrize("image", ["petals-chat-ui", "petals-chat-gateway"])
def test_host_bytecode_and_caches_stay_out_of_the_image(built_images: None, image: str) -> None:
    name = f"look-{image}-{uuid.uuid4().hex[:8]}"
    subprocess.run([*BUILDAH, "from", "--pull-never", "--name", name, image], check=True, capture_output=True)
    try:
        mounted = subprocess.run([*BUILDAH, "mount", name], check=True, capture_output=True, text=True)
        mount = Path(mounted.stdout.strip())
        app = [p.relative_to(mount / "app").as_posix() for p in (mount / "app").rglob("*")]
    finally:
        subprocess.run([*BUILDAH, "rm", name], capture_output=True)
    assert any(p.startswith("services/common/") for p in app), app
    junk = [p for p in app if "planted" in p or p.endswith((".pyc", "__pycache__", ".pytest_cache", ".ruff_cache"))]
    assert junk == [], junk


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(tmp_path: Path, image: str, env: dict[str, str], *paths: str) -> dict:
    """Starts ``image``'s service inside a buildah container and returns the probe's answers."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    name = f"probe-{image}-{uuid.uuid4().hex[:8]}"
    subprocess.run([*BUILDAH, "from", "--pull-never", "--name", name, image], check=True, capture_output=True)
    try:
        env_args = [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]
        mount = ["-v", f"{script}:/probe.py:ro"]
        command = ["python", "/probe.py", str(free_port()), *paths]
        result = subprocess.run(
            [*BUILDAH, "run", "--isolation", "chroot", *env_args, *mount, name, "--", *command],
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        subprocess.run([*BUILDAH, "rm", name], capture_output=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, f"no probe output (rc {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("PROBE "))


def test_ui_image_serves_health_and_page(built_images: None, tmp_path: Path) -> None:
    answers = probe(tmp_path, "petals-chat-ui", {"GUNICORN_CONF": "services/ui/gunicorn.conf.py"}, "/healthz", "/")
    assert answers["/healthz"].get("status") == 200, answers["/healthz"]
    assert answers["/"].get("status") == 200, answers["/"]
    assert "Petals Chat" in answers["/"]["body"]


def test_gateway_image_serves_health(built_images: None, tmp_path: Path) -> None:
    env = {
        "GUNICORN_CONF": "services/gateway/gunicorn.conf.py",
        # any URL: /healthz answers without a replica
        "INFERENCE_REPLICAS": "inference-0=http://127.0.0.1:9",
    }
    answers = probe(tmp_path, "petals-chat-gateway", env, "/healthz")
    assert answers["/healthz"].get("status") == 200, answers["/healthz"]
