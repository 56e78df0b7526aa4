"""The LM head batcher: concurrent callers grouped, a lone caller alone, failures isolated, rows routed back."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch

from services.inference.head_batching import HeadBatcher

WEIGHT = torch.randn(50, 8)


class FakeHead:
    """The head's two products on ``WEIGHT``; the first product waits for ``gate`` while ``hold`` is set."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.together_calls = 0
        self.gate = threading.Event()
        self.hold = threading.Event()
        self.started = threading.Event()

    def alone(self, vector: torch.Tensor) -> torch.Tensor:
        self._wait()
        return torch.mv(WEIGHT, vector)

    def together(self, matrix: torch.Tensor) -> torch.Tensor:
        self.together_calls += 1
        self._wait()
        return torch.nn.functional.linear(matrix, WEIGHT)

    def _wait(self) -> None:
        self.started.set()
        if self.hold.is_set():
            assert self.gate.wait(10)
            self.hold.clear()

    def batcher(self, max_batch: int = 64) -> HeadBatcher:
        return HeadBatcher(self.alone, self.together, self.sizes.append, max_batch)


def _poll(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def _queued_behind_a_running_product(head: FakeHead, batcher: HeadBatcher, vectors: list[torch.Tensor]):
    """Futures of ``vectors[0]``'s product, held running, and of the others, queued behind it."""
    head.hold.set()
    pool = ThreadPoolExecutor(len(vectors))
    first = pool.submit(batcher, vectors[0])
    assert head.started.wait(10)
    others = [pool.submit(batcher, vector) for vector in vectors[1:]]
    _poll(lambda: len(batcher._queue) == len(others))
    head.gate.set()
    pool.shutdown(wait=True)
    return [first, *others]


def _result(future: Future) -> torch.Tensor:
    return future.result(timeout=10)


def test_a_lone_caller_computes_alone():
    head = FakeHead()
    vector = torch.randn(8)
    logits = head.batcher()(vector)
    assert torch.equal(logits, torch.mv(WEIGHT, vector))
    assert head.sizes == [1] and head.together_calls == 0


def test_callers_that_wait_together_share_one_product_and_each_gets_its_own_row():
    head = FakeHead()
    vectors = [torch.randn(8) for _ in range(4)]
    futures = _queued_behind_a_running_product(head, head.batcher(), vectors)
    assert head.sizes == [1, 3] and head.together_calls == 1
    for vector, future in zip(vectors, futures, strict=True):
        torch.testing.assert_close(_result(future), torch.mv(WEIGHT, vector))
        assert int(_result(future).argmax()) == int(torch.mv(WEIGHT, vector).argmax())


def test_a_batch_holds_at_most_max_batch_callers():
    head = FakeHead()
    vectors = [torch.randn(8) for _ in range(6)]
    futures = _queued_behind_a_running_product(head, head.batcher(max_batch=2), vectors)
    assert head.sizes == [1, 2, 2, 1]
    for vector, future in zip(vectors, futures, strict=True):
        torch.testing.assert_close(_result(future), torch.mv(WEIGHT, vector))


def test_one_callers_failure_fails_that_caller_alone():
    head = FakeHead()
    vectors = [torch.randn(8), torch.randn(8), torch.randn(7), torch.randn(8)]  # the third fits no product
    futures = _queued_behind_a_running_product(head, head.batcher(), vectors)
    with pytest.raises(RuntimeError):
        _result(futures[2])
    for index in (0, 1, 3):
        torch.testing.assert_close(_result(futures[index]), torch.mv(WEIGHT, vectors[index]))


def test_a_failing_lone_product_raises_to_its_caller_and_the_next_caller_is_served():
    head = FakeHead()
    batcher = head.batcher()
    with pytest.raises(RuntimeError):
        batcher(torch.randn(3))
    vector = torch.randn(8)
    assert torch.equal(batcher(vector), torch.mv(WEIGHT, vector))


def test_many_concurrent_callers_all_get_their_own_rows():
    head = FakeHead()
    batcher = head.batcher()
    vectors = [torch.randn(8) for _ in range(200)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(batcher, vectors))
    for vector, logits in zip(vectors, results, strict=True):
        torch.testing.assert_close(logits, torch.mv(WEIGHT, vector))
    assert sum(head.sizes) == len(vectors) and not batcher._running and not batcher._queue
