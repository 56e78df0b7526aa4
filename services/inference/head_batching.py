"""Batching of concurrent sessions' LM head products (REPLICA_HEAD_BATCHING): the head read once per step for all.

Every generated token ends with ``logits = weight @ hidden`` over the whole vocabulary, a product
bound by reading the weight (SmolLM2's float32 head: 113 MB per token). Sessions generating at the
same time each read it again. A ``HeadBatcher`` stacks the last hidden states of the sessions that
wait for the head at the same moment and multiplies them at once (``[k, hidden] @ weight.T``), each
caller getting its own row back:

- no waiting window: a caller that finds no product running computes alone, at today's cost, by the
  one-token path (lm_head.py's fast paths); a caller that finds one running queues, and when it
  ends, the first queued caller leads the next product for everyone queued then (at most
  ``max_batch``), while the finished callers return at once;
- errors are isolated: a batch whose product fails is computed again row by row, alone, so each
  caller gets its own result or its own exception.

Results: a batch of one is the one-token path's, bit for bit. A product of ``k > 1`` rows is a matrix
product, whose float32 reduction order differs from the matrix-vector product's: its logits differ in
the last bits (up to 6e-5 on a random 49,152 x 576 head, logits of order 20; the same order as the
swarm's own float differences), so a token may depend on which sessions shared its product only where
two logits tie within that. Greedy tokens stay transformers' (whose in-process head sums in yet
another order): test_batching_oracle.py runs replica sessions at once, with batches of more than one,
against the oracle token for token.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

MAX_BATCH = 64  # rows of one product at most (the replica's request threads bound it too)


class _Caller:
    """One caller's row: its hidden state, then its logits or its error."""

    __slots__ = ("batch", "done", "error", "logits", "vector")

    def __init__(self, vector: torch.Tensor) -> None:
        self.vector = vector
        self.logits: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.batch: list[_Caller] | None = None  # set when this caller is to lead the product of ``batch``
        self.done = threading.Event()  # its result is there, or it leads ``batch``

    def result(self) -> torch.Tensor:
        if self.logits is None:
            raise self.error or RuntimeError("no logits")
        return self.logits


class HeadBatcher:
    """Computes one-token head products, those of concurrent callers as one product (module docstring).

    ``alone(vector [hidden]) -> [vocabulary]`` is the one-token product; ``together(matrix [k, hidden])
    -> [k, vocabulary]`` the product of several; ``observe(k)`` is told each product's size.
    """

    def __init__(
        self,
        alone: Callable[[torch.Tensor], torch.Tensor],
        together: Callable[[torch.Tensor], torch.Tensor],
        observe: Callable[[int], None] = lambda size: None,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._alone = alone
        self._together = together
        self._observe = observe
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Caller] = []
        self._running = False

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        """The logits ``[vocabulary]`` of one hidden state ``[hidden]``; raises what its product raised."""
        caller = _Caller(vector)
        with self._lock:
            if self._running:
                self._queue.append(caller)
            else:
                self._running = True
                caller.batch = [caller]
        if caller.batch is None:
            caller.done.wait()  # a result, or the lead of the next batch
        if caller.batch is not None:
            self._lead(caller.batch)
        return caller.result()

    def _lead(self, batch: list[_Caller]) -> None:
        try:
            self._compute(batch)
        finally:  # whatever happened, the queue moves on and no caller of this batch waits for ever
            self._hand_over()
            for caller in batch:
                if caller.logits is None and caller.error is None:
                    caller.error = RuntimeError("the LM head's batched product was interrupted")
                caller.done.set()

    def _hand_over(self) -> None:
        """Make the first queued caller lead the queued ones, or mark the head idle."""
        with self._lock:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            self._running = bool(batch)
        if batch:
            batch[0].batch = batch
            batch[0].done.set()

    def _compute(self, batch: list[_Caller]) -> None:
        self._observe(len(batch))
        if len(batch) == 1:
            self._compute_alone(batch[0])
            return
        try:
            rows = self._together(torch.stack([caller.vector for caller in batch]))
        except Exception:  # e.g. one caller's odd shape: each alone, so only its own caller fails
            for caller in batch:
                self._compute_alone(caller)
            return
        for index, caller in enumerate(batch):
            caller.logits = rows[index]

    def _compute_alone(self, caller: _Caller) -> None:
        try:
            caller.logits = self._alone(caller.vector)
        except Exception as error:
            caller.error = error
