"""Which torch the setup installs (scripts/install_torch.py), and that an unreachable index costs no wait."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from scripts import install_torch
from scripts.pins import index_problem


@pytest.fixture
def nothing_configured(monkeypatch):
    """pip's configuration offers no CPU build; PyTorch's index cannot be reached."""
    monkeypatch.setattr(install_torch, "pip_provides", lambda requirement: False)
    monkeypatch.setattr(install_torch, "index_problem", lambda url: "Name or service not known")


def test_a_wheels_folder_comes_first(tmp_path, nothing_configured):
    source = install_torch.choose({"TORCH_WHEELS": str(tmp_path)})
    assert (source.requirements, source.pip_sources) == ("torch-cpu", ("--find-links", str(tmp_path)))


def test_a_wheels_folder_that_is_not_one_is_a_one_line_error(tmp_path, nothing_configured):
    with pytest.raises(SystemExit, match=r"^TORCH_WHEELS must be a folder of wheels, got '.*nowhere'$"):
        install_torch.choose({"TORCH_WHEELS": str(tmp_path / "nowhere")})


def test_pips_own_configuration_comes_next(monkeypatch, nothing_configured):
    monkeypatch.setattr(install_torch, "pip_provides", lambda requirement: requirement == "torch==2.13.0+cpu")
    source = install_torch.choose({})
    assert (source.requirements, source.pip_sources) == ("torch-cpu", ())


def test_then_pytorchs_cpu_index(monkeypatch, nothing_configured):
    monkeypatch.setattr(install_torch, "index_problem", lambda url: None)
    source = install_torch.choose({"TORCH_CPU_INDEX": "https://mirror.example/cpu"})
    assert source.requirements == "torch-cpu"
    assert source.pip_sources == ("--extra-index-url", "https://mirror.example/cpu")


def test_else_pypis_cuda_build_says_why_and_what_to_do(nothing_configured):
    source = install_torch.choose({})
    assert (source.requirements, source.pip_sources) == ("torch-gpu", ())
    assert "cannot be reached (Name or service not known)" in source.description
    assert "TORCH_WHEELS" in source.description


def test_an_index_that_never_answers_costs_the_probes_limit_only():
    """A server that accepts the connection and says nothing: the probe gives up at its limit."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    try:
        started = time.monotonic()
        problem = index_problem(f"http://127.0.0.1:{listener.getsockname()[1]}/whl/cpu", timeout=1.0)
        elapsed = time.monotonic() - started
    finally:
        listener.close()
    assert problem is not None and "timed out" in problem
    assert elapsed < 3.0
