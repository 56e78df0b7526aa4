"""CPU sizing: what the kernel grants (affinity, cgroup quota) and the CPU's native dtypes."""

from __future__ import annotations

import os

import pytest

from services.common.processes import cpus
from services.common.startup.config import Env
from services.inference.settings import InferenceSettings, default_dtype


@pytest.fixture
def cgroup_v2(tmp_path, monkeypatch):
    """Point the helpers at a fake cgroup v2 ``cpu.max``."""
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(cpus, "_CGROUP_V2_MAX", cpu_max)
    return cpu_max


@pytest.mark.parametrize(("line", "quota", "cores"), [("150000 100000", 1.5, 2), ("50000 100000", 0.5, 1)])
def test_a_cgroup_quota_caps_the_cpus(cgroup_v2, monkeypatch, line, quota, cores):
    cgroup_v2.write_text(line + "\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert cpus.cgroup_cpu_quota() == quota
    assert cpus.available_cpus() == cores


def test_no_quota_leaves_the_affinity(cgroup_v2, monkeypatch):
    cgroup_v2.write_text("max 100000\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert cpus.cgroup_cpu_quota() is None
    assert cpus.available_cpus() == 3


def test_an_unreadable_quota_counts_as_none(cgroup_v2, monkeypatch, tmp_path):
    cgroup_v2.write_text("garbage\n")
    assert cpus.cgroup_cpu_quota() is None


@pytest.mark.parametrize(("flags", "native"), [("fpu avx512f avx512_bf16", False), ("fpu amx_bf16 amx_tile", True)])
def test_native_bf16_means_amx(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cpus.cpu_has_native_bf16(cpuinfo) is native


def test_inference_threads_default_to_the_granted_cpus_and_can_be_set(monkeypatch):
    monkeypatch.setattr("services.inference.settings.available_cpus", lambda: 3)
    assert InferenceSettings.from_env(Env({"MODEL": "/m"})).torch_threads == 3
    assert InferenceSettings.from_env(Env({"MODEL": "/m", "TORCH_THREADS": "1"})).torch_threads == 1


def test_dtype_default_is_the_fast_one(monkeypatch):
    monkeypatch.setattr("services.inference.settings.cpu_has_native_bf16", lambda: False)
    assert default_dtype("cpu") == "float32"
    assert default_dtype("cuda") == "bfloat16"
    monkeypatch.setattr("services.inference.settings.cpu_has_native_bf16", lambda: True)
    assert default_dtype("cpu") == "bfloat16"
