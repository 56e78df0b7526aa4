"""checkov finds no failed check on the rendered chart and the Dockerfiles, bar the justified skips."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.chart.test_chart import combo_values, render

ROOT = Path(__file__).resolve().parents[2]
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"  # its own venv: see requirements/checkov.txt

KUBERNETES_SKIPS = {
    # CPU limits throttle a latency-sensitive service (every token waits on it); requests are set
    # for scheduling, memory has both requests and limits.
    "CKV_K8S_11",
    # Pull policy and digests are the operator's choice through image.pullPolicy and image.tag (a
    # tag may carry a digest: "0.1.0@sha256:..."); IfNotPresent with a fixed tag is the default.
    "CKV_K8S_15",
    "CKV_K8S_43",
}
DOCKERFILE_SKIPS = {
    # No HEALTHCHECK by design: Kubernetes probes /healthz and /readyz (docs/deploying.md, "Container images").
    "CKV_DOCKER_2",
    # The base is pinned through the BASE_IMAGE build argument (python:3.11.7-slim-bookworm) and
    # the other FROM lines name build stages, which checkov cannot tell from untagged images.
    "CKV_DOCKER_7",
}


def failed_checks(args: list[str], skips: set[str]) -> list[tuple[str, str, str]]:
    command = [str(CHECKOV), *args, "--skip-download", "--skip-check", ",".join(sorted(skips)), "-o", "json"]
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert all(r["summary"]["parsing_errors"] == 0 for r in reports), result.stdout[:2000]
    assert sum(r["summary"]["passed"] for r in reports) > 0, "checkov checked nothing"
    return [
        (check["check_id"], check["check_name"], check["resource"])
        for report in reports
        for check in report["results"]["failed_checks"]
    ]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_rendered_chart_passes_checkov(chart, variant, tmp_path):
    """Everything on (ingress, monitoring, a private swarm, the replicas autoscaled: KEDA down to zero on cpu, an
    HPA on gpu): the widest render."""
    autoscaling = (
        {"enabled": True, "engine": "keda", "minReplicas": 0}
        if variant == "cpu"
        else {"enabled": True, "engine": "hpa"}
    )
    values = combo_values(variant, True, True, True)
    values["inference"]["autoscaling"] = autoscaling
    docs = render(chart, values)
    (tmp_path / "rendered.yaml").write_text(yaml.safe_dump_all(docs))
    assert failed_checks(["-d", str(tmp_path), "--framework", "kubernetes"], KUBERNETES_SKIPS) == []


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_passes_checkov(dockerfile):
    assert failed_checks(["-f", dockerfile, "--framework", "dockerfile"], DOCKERFILE_SKIPS) == []
