"""services/swarm/small_tensors.py: small CPU tensors cross processes by value, others as torch sends them."""

from __future__ import annotations

import multiprocessing
from multiprocessing.reduction import ForkingPickler

import petals.server.task_pool as task_pool
import pytest
import torch

from services.swarm import small_tensors

LIMIT = 4096


@pytest.fixture
def installed(monkeypatch):
    """small_tensors installed with LIMIT for one test; torch's reducer and Petals' function restored after."""
    monkeypatch.setitem(ForkingPickler._extra_reducers, torch.Tensor, ForkingPickler._extra_reducers[torch.Tensor])
    monkeypatch.setattr(task_pool, "_move_to_device_if_tensor", task_pool._move_to_device_if_tensor)
    small_tensors.install(LIMIT)


def _echo(connection) -> None:
    """In a forked child: send back every tensor received, with whether it arrived in shared memory."""
    while (tensor := connection.recv()) is not None:
        connection.send((tensor, tensor.is_shared()))


def round_trip_through_a_fork(tensors: list[torch.Tensor]) -> list[tuple[torch.Tensor, bool]]:
    """Each tensor sent to a forked process and back, with whether the child received it shared."""
    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe()
    process = context.Process(target=_echo, args=(child,), daemon=True)
    process.start()
    try:
        results = []
        for tensor in tensors:
            parent.send(tensor)
            results.append(parent.recv())
        parent.send(None)
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
    assert process.exitcode == 0
    return results


SMALL = [
    torch.randn(3, 5),
    torch.randn(2, 7).to(torch.bfloat16),
    torch.tensor([[True, False], [False, True]]),
    torch.arange(12, dtype=torch.int64).reshape(3, 4),
    torch.empty(0, 8),
    torch.randn(6, 4).t(),  # not contiguous
    torch.tensor(2.5),  # zero-dimensional
]


def test_small_tensors_round_trip_by_value_exactly(installed):
    for sent, (received, shared) in zip(SMALL, round_trip_through_a_fork(SMALL), strict=True):
        assert not shared, sent
        assert received.dtype == sent.dtype and received.shape == sent.shape
        assert torch.equal(received, sent)
        assert not received.is_shared()


def test_a_small_tensor_pickles_to_about_its_own_size(installed):
    tensor = torch.randn(256)  # 1 KiB
    assert len(ForkingPickler.dumps(tensor)) < tensor.nbytes + 300


def test_tensors_over_the_limit_shared_or_needing_a_gradient_keep_torchs_shared_memory(installed):
    large = torch.randn(LIMIT // 4 + 1)
    shared = torch.randn(4).share_memory_()
    leaf_with_grad = torch.randn(4, requires_grad=True)
    results = round_trip_through_a_fork([large, shared, leaf_with_grad])
    for sent, (received, child_shared) in zip([large, shared, leaf_with_grad], results, strict=True):
        assert child_shared, sent
        assert torch.equal(received.detach(), sent.detach())
    assert results[2][0].requires_grad


def test_without_install_torch_shares_small_tensors_too():
    ((_, shared),) = round_trip_through_a_fork([torch.randn(4)])
    assert shared


def test_a_limit_of_zero_installs_nothing():
    reducer, move = ForkingPickler._extra_reducers[torch.Tensor], task_pool._move_to_device_if_tensor
    small_tensors.install(0)
    assert ForkingPickler._extra_reducers[torch.Tensor] is reducer
    assert task_pool._move_to_device_if_tensor is move


def test_the_task_pool_leaves_small_outputs_out_of_shared_memory(installed):
    move = task_pool._move_to_device_if_tensor
    small, large = torch.randn(8), torch.randn(LIMIT // 4 + 1)
    assert not move(small, "cpu", share_memory=True).is_shared()
    assert move(large, "cpu", share_memory=True).is_shared()
    with_grad = move(torch.randn(3, requires_grad=True), "cpu", share_memory=True)
    assert with_grad.requires_grad and not with_grad.is_shared()
    assert torch.equal(move(small, "cpu", share_memory=True), small)
    assert move(7, "cpu", share_memory=True) == 7


def test_installing_twice_wraps_petals_function_once(installed):
    small_tensors.install(LIMIT)
    move = task_pool._move_to_device_if_tensor
    assert not hasattr(move.original, "original")


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        (small_tensors.LIMIT_ENV, "-1", "must be >= 0, got -1"),
        ("SWARM_BOOTSTRAP_WAIT_SECONDS", "soon", "must be a number, got 'soon'"),
    ],
)
def test_the_server_entry_point_rejects_a_bad_setting_in_one_line(monkeypatch, capsys, name, value, error):
    from services.swarm import serve

    monkeypatch.setenv(name, value)
    assert serve.main(["some/model"]) == 2
    assert capsys.readouterr().err.strip() == f"serve: {name} {error}"
