"""A faster CPU LM head for one token: the matrix-vector product, done as one.

A client step ends with ``logits = weight @ hidden`` over the whole vocabulary; for a large model
the weight is gigabytes and the step is bound by memory bandwidth (bench/lm_head.py measures it).

- bfloat16 (the default on a CPU with AMX): Petals' head multiplies a ``[1, hidden]`` matrix,
  which torch runs on a path that reads 11 GB/s; ``torch.mv`` on the same weight reads 29 GB/s,
  at this machine's bandwidth, with the same logits bit for bit (BLOOM-176B's head: 0.26 s
  against 0.87 s per token). Heads under ``MIN_WEIGHT_BYTES`` (the tiny BLOOM's, SmolLM2's) keep
  the stock path: in a tight loop mv was faster on them too, but in the replica its threads cost more.
- float32: one token's product split by rows over threads of one intra-op thread each. On an AMD
  EPYC machine two such threads read 45-51 GB/s where MKL's sgemv on two threads read 25-28 (on
  a quiet machine; loaded, it lost); on an Intel Xeon both read 33 GB/s.

Prompts (several tokens) stay on the stock path, a matrix product that is not bandwidth-bound.

With REPLICA_HEAD_BATCHING every head (of any size) takes one-token calls through a
``head_batching.HeadBatcher``: a token alone by the path above, the tokens of sessions waiting at the
same moment as one product of their rows (``_together``; the row split's blocks by ``_rows_product``).

The head is Petals' ``LMHead``: ``install`` replaces its ``forward`` on the one instance and reads
its ``use_chunked_forward``; fenced to petals 2.2.0.post1 (``check``; docs/patches.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from services.common.startup.patching import PatchError, require_attributes, require_version
from services.inference.head_batching import HeadBatcher

T = TypeVar("T")
PATCH = "lm_head"
PATCHED_VERSION = "2.2.0.post1"  # petals
# Below this the stock product is fast enough, and torch.mv's or the row split's threads cost more
# than they save: with mv on the tiny BLOOM's 32 MB head, v1 one-token-per-request clients at one
# session reached 0.87x the raw client's tokens/s, against 0.92x without (bench/concurrency.py).
MIN_WEIGHT_BYTES = 64 * 2**20
# A float32 24,576-row block of SmolLM2's head on one thread (AMD EPYC, loaded; CPU time, two runs):
# 2 to 4 rows took 0.5-1.1x one row's ``torch.mv`` as ``weight @ matrix.T`` but 2.1-4.2x as ``linear``;
# 12 and 16 rows 2.7-3.1x as ``linear`` and 3.0-3.8x the other way (docs/benchmarks.md).
SKINNY_ROWS = 8


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


def _rows_product(weight: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """The logits ``[k, rows]`` of ``k`` hidden states: up to ``SKINNY_ROWS`` as ``weight @ matrix.T``,
    more as ``matrix @ weight.T`` (``linear``): the faster of the two on either side (``SKINNY_ROWS``)."""
    with torch.inference_mode():
        if matrix.shape[0] <= SKINNY_ROWS:
            return torch.mm(weight, matrix.T).T
        return torch.nn.functional.linear(matrix, weight)


class OneTokenLMHead:
    """Replaces ``lm_head.forward``: one token's logits by ``_alone``, or through a ``HeadBatcher`` with
    other sessions' (``batch_observer`` given: told each product's size); anything else the stock way."""

    def __init__(self, lm_head: torch.nn.Module, batch_observer: Callable[[int], None] | None = None) -> None:
        self._stock_forward = lm_head.forward
        self._lm_head = lm_head
        self._one_token: Callable[[torch.Tensor], torch.Tensor] = (
            self._alone if batch_observer is None else HeadBatcher(self._alone, self._together, batch_observer)
        )

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[:-1].numel() != 1 or torch.is_grad_enabled():
            return self._stock_forward(hidden_states)
        logits = self._one_token(hidden_states.reshape(-1).to(self._lm_head.weight.dtype))
        return logits.view(*hidden_states.shape[:-1], -1)

    def _alone(self, vector: torch.Tensor) -> torch.Tensor:
        """One token's logits ``[vocabulary]``."""
        return torch.mv(self._lm_head.weight, vector)

    def _together(self, matrix: torch.Tensor) -> torch.Tensor:
        """The logits ``[k, vocabulary]`` of ``k`` tokens (of different sessions)."""
        return self._stock_forward(matrix)

    def close(self) -> None:
        """Release what the head holds (nothing here)."""


class StockOneTokenLMHead(OneTokenLMHead):
    """One token's logits the stock way (a small head, or Petals' chunked one); there only to batch them."""

    def _alone(self, vector: torch.Tensor) -> torch.Tensor:
        return self._stock_forward(vector[None])[0]


class RowSplitLMHead(OneTokenLMHead):
    """One token's (or a batch's) logits from ``threads`` row blocks computed at once."""

    def __init__(
        self, lm_head: torch.nn.Module, threads: int, batch_observer: Callable[[int], None] | None = None
    ) -> None:
        super().__init__(lm_head, batch_observer)
        rows = lm_head.weight.shape[0]
        step = -(-rows // threads)
        self._blocks = [(start, min(start + step, rows)) for start in range(0, rows, step)]
        self._pool = _single_threaded_pool(threads)

    def _alone(self, vector: torch.Tensor) -> torch.Tensor:
        weight = self._lm_head.weight
        logits = torch.empty(weight.shape[0], dtype=weight.dtype)
        blocks = [
            self._pool.submit(_product, weight[start:end], vector, logits[start:end]) for start, end in self._blocks
        ]
        for block in blocks:
            block.result()  # waits; re-raises a failure
        return logits

    def _together(self, matrix: torch.Tensor) -> torch.Tensor:
        weight = self._lm_head.weight
        blocks = [self._pool.submit(_rows_product, weight[start:end], matrix) for start, end in self._blocks]
        return torch.cat([block.result() for block in blocks], dim=1)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def check() -> None:
    """Raise PatchError unless Petals' ``LMHead`` is the one this module replaces the forward of."""
    require_version("petals", PATCHED_VERSION, PATCH)
    from petals.client.lm_head import LMHead

    require_attributes(LMHead, ("forward", "chunked_forward"), PATCH)
    if "use_chunked_forward" not in LMHead.__init__.__code__.co_names:  # the attribute it sets and install reads
        raise PatchError(PATCH, "petals.client.lm_head.LMHead.use_chunked_forward, which is no longer set")


def install(
    lm_head: torch.nn.Module, threads: int, batch_observer: Callable[[int], None] | None = None
) -> OneTokenLMHead | None:
    """The one-token forward for a CPU head of ``MIN_WEIGHT_BYTES`` or more: ``torch.mv`` for a
    bfloat16 head that Petals multiplies natively (not in its float32 chunks, as on a CPU without
    AVX-512), the row split for a float32 head; with ``batch_observer`` (REPLICA_HEAD_BATCHING), every
    head batches concurrent sessions' tokens (head_batching.py) and the observer is told each batch's
    size; None where the stock forward stays. Raises PatchError (``check``) where Petals' head is not
    the one it fits."""
    check()
    head = _one_token_head(lm_head, threads, batch_observer)
    if head is not None:
        lm_head.forward = head
    return head


def _one_token_head(
    lm_head: torch.nn.Module, threads: int, batch_observer: Callable[[int], None] | None
) -> OneTokenLMHead | None:
    weight = lm_head.weight
    if weight.device.type == "cpu" and weight.numel() * weight.element_size() >= MIN_WEIGHT_BYTES:
        if weight.dtype == torch.bfloat16 and not getattr(lm_head, "use_chunked_forward", False):
            return OneTokenLMHead(lm_head, batch_observer)
        if threads >= 2 and weight.dtype == torch.float32:
            return RowSplitLMHead(lm_head, threads, batch_observer)
    return None if batch_observer is None else StockOneTokenLMHead(lm_head, batch_observer)
