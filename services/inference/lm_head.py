"""A faster CPU LM head for one token: the matrix-vector product split by rows over threads.

A client step ends with ``logits = weight @ hidden`` over the whole vocabulary; for a large model
the weight is gigabytes and the step is bound by memory bandwidth. torch's own product (MKL's
sgemv) with two intra-op threads reads about 25-28 GB/s on this project's machine, while two
threads that each multiply half of the rows on one intra-op thread read about 45-51 GB/s
(bench/lm_head.py). Prompts (several tokens) stay on the stock path, a matrix product that is
not bandwidth-bound.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
MIN_WEIGHT_BYTES = 64 * 2**20  # below this the stock product is as fast and splitting costs more


def _one_intra_op_thread() -> None:
    torch.set_num_threads(1)
    torch.get_num_threads()  # the thread's first torch call: it now keeps 1 whatever the default becomes


def _in_a_new_thread(call: Callable[[], T]) -> T:
    """``call()`` run in a thread started for it (torch's thread default applies there)."""
    results: list[T] = []
    thread = threading.Thread(target=lambda: results.append(call()))
    thread.start()
    thread.join()
    return results[0]


def _single_threaded_pool(threads: int) -> ThreadPoolExecutor:
    """``threads`` worker threads whose torch runs on one intra-op thread each.

    ``torch.set_num_threads`` changes the calling thread and the default that threads take at
    their first torch call; so each worker sets 1 and makes that first call as it starts, then
    the default the process had is put back from a throwaway thread.
    """
    default = _in_a_new_thread(torch.get_num_threads)
    started = threading.Barrier(threads + 1)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="lm-head", initializer=_one_intra_op_thread)
    for _ in range(threads):
        pool.submit(started.wait)
    started.wait()
    _in_a_new_thread(lambda: torch.set_num_threads(default))
    return pool


def _product(weight: torch.Tensor, vector: torch.Tensor, out: torch.Tensor) -> None:
    with torch.inference_mode():  # thread-local: the caller's mode does not reach the pool's threads
        torch.mv(weight, vector, out=out)


class RowSplitLMHead:
    """Replaces ``lm_head.forward``: one token's logits from ``threads`` row blocks computed at once."""

    def __init__(self, lm_head: torch.nn.Module, threads: int) -> None:
        self._stock_forward = lm_head.forward
        self._lm_head = lm_head
        rows = lm_head.weight.shape[0]
        step = -(-rows // threads)
        self._blocks = [(start, min(start + step, rows)) for start in range(0, rows, step)]
        self._pool = _single_threaded_pool(threads)

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self._lm_head.weight
        if hidden_states.shape[:-1].numel() != 1 or torch.is_grad_enabled():
            return self._stock_forward(hidden_states)
        vector = hidden_states.reshape(-1).to(weight.dtype)
        logits = torch.empty(weight.shape[0], dtype=weight.dtype)
        blocks = [
            self._pool.submit(_product, weight[start:end], vector, logits[start:end]) for start, end in self._blocks
        ]
        for block in blocks:
            block.result()  # waits; re-raises a failure
        return logits.view(*hidden_states.shape[:-1], -1)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def install(lm_head: torch.nn.Module, threads: int) -> RowSplitLMHead | None:
    """Use the row-split forward on a CPU float32 head large enough to gain; None when it would not."""
    weight = lm_head.weight
    big_enough = weight.numel() * weight.element_size() >= MIN_WEIGHT_BYTES
    if threads < 2 or weight.device.type != "cpu" or weight.dtype != torch.float32 or not big_enough:
        return None
    lm_head.forward = RowSplitLMHead(lm_head, threads)
    return lm_head.forward
