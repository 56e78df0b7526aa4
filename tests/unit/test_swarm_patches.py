"""A Petals server's patches are fenced: each refuses another library version or a missing
attribute with one line, the installed versions pass, and serve.py stops on a misfit at once."""

from __future__ import annotations

from multiprocessing.reduction import ForkingPickler

import petals.server.task_pool as task_pool
import pytest
import torch
import torch.multiprocessing.reductions as torch_reductions

from services.swarm import bitsandbytes_triton, patches, serve, small_tensors
from tests.unit.fences import assert_refused, pretend_version, refusal


@pytest.fixture
def restored(monkeypatch):
    """torch's reducer and Petals' task-pool function restored after the test."""
    monkeypatch.setitem(ForkingPickler._extra_reducers, torch.Tensor, ForkingPickler._extra_reducers[torch.Tensor])
    monkeypatch.setattr(task_pool, "_move_to_device_if_tensor", task_pool._move_to_device_if_tensor)


def test_the_installed_versions_fit():
    small_tensors.check()
    bitsandbytes_triton.check()  # also where it is not needed (no triton here): its fence holds all the same


@pytest.mark.parametrize(
    ("module", "dist"),
    [(small_tensors, "petals"), (bitsandbytes_triton, "bitsandbytes")],
    ids=["small_tensors", "bitsandbytes_triton"],
)
def test_another_version_is_refused_in_one_line(monkeypatch, module, dist):
    pretend_version(monkeypatch, dist)
    assert_refused(module.check, refusal(module.PATCH, dist, module.PATCHED_VERSION))


@pytest.mark.parametrize(
    ("owner", "name"), [(task_pool, "_move_to_device_if_tensor"), (torch_reductions, "reduce_tensor")]
)
def test_small_tensors_refuses_a_missing_attribute(monkeypatch, owner, name):
    monkeypatch.delattr(owner, name)
    assert_refused(
        small_tensors.check, f"small_tensors patches {owner.__name__}.{name}, which is missing; see docs/patches.md"
    )


def test_small_tensors_refuses_a_task_pool_function_of_another_signature(monkeypatch):
    def _move_to_device_if_tensor(arg, device): ...

    monkeypatch.setattr(task_pool, "_move_to_device_if_tensor", _move_to_device_if_tensor)
    with pytest.raises(RuntimeError, match=r"\(arg, device, share_memory\), found parameters \(arg, device\)"):
        small_tensors.check()


def test_bitsandbytes_triton_refuses_a_bitsandbytes_without_is_triton_available(monkeypatch):
    monkeypatch.setattr(bitsandbytes_triton, "_read", lambda path: "")
    assert_refused(
        bitsandbytes_triton.check,
        "bitsandbytes_triton patches bitsandbytes.triton.triton_utils.is_triton_available, which is missing; "
        "see docs/patches.md",
    )


def test_a_refused_install_patches_nothing(monkeypatch, restored):
    move, reducer = task_pool._move_to_device_if_tensor, ForkingPickler._extra_reducers[torch.Tensor]
    pretend_version(monkeypatch, "petals")
    assert_refused(lambda: patches.install(4096), refusal("small_tensors", "petals", small_tensors.PATCHED_VERSION))
    assert task_pool._move_to_device_if_tensor is move
    assert ForkingPickler._extra_reducers[torch.Tensor] is reducer


def test_patches_install_installs_them(monkeypatch, restored):
    monkeypatch.setattr(bitsandbytes_triton, "needed", lambda: False)  # the stand-in's own tests cover it
    patches.install(4096)
    assert task_pool._move_to_device_if_tensor.original is not None


def test_serve_stops_at_once_with_the_line(monkeypatch, capsys, restored):
    monkeypatch.setattr(bitsandbytes_triton, "needed", lambda: False)
    monkeypatch.setattr(serve, "wait_for_a_peer", lambda *args: pytest.fail("waited for a peer"))
    pretend_version(monkeypatch, "petals")
    assert serve.main(["/models/tiny-bloom"]) == 2
    line = refusal("small_tensors", "petals", small_tensors.PATCHED_VERSION)
    assert capsys.readouterr().err == f"serve: {line}\n"
