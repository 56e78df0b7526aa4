"""The server side of the grouped inference stream (services/common/p2p/grouped_steps.py), with SWARM_BATCHING.

``install()`` adds ``rpc_inference_group`` to Petals' ``TransformerConnectionHandler``, next to its
``rpc_inference`` (which stays as it is: stock clients see no change). A grouped stream serves one
client on one span of the server's blocks:

- each session it opens gets its own attention cache from the server's memory cache (Petals'
  ``_allocate_cache``, failing at once when there is no room), freed when the client closes the
  session, when the stream ends, or after the server's session timeout;
- the steps of a request, prompts among them, go to the batching pool as one task (``GroupedRows``):
  one pass through the blocks for all of them, joined by any other steps queued for the same span;
- a step longer than Petals' short-inference limit (a long prompt, a replay after a failure) is
  Petals' own step, block by block, as ``rpc_inference`` would run it;
- a step that fails (no room, too long, a failed pass) is answered as failed; the others are done.

Fenced with the batching pool: petals 2.2.0.post1, hivemind 1.1.11 (``check``; docs/patches.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, AsyncIterator  # noqa: UP035  (hivemind sees a stream only in typing's AsyncIterator)

import torch
from hivemind import anext
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from services.common.p2p.grouped_steps import METHOD, GroupRequest, GroupResponse, GroupStep
from services.common.startup.patching import PatchError, require_attributes, require_version
from services.swarm.batching_pool import PATCHED_VERSIONS, GroupedRows

PATCH = "grouped_inference"
NO_ADAPTER = ""  # Petals' active_adapter when a request names none


@dataclass
class _Session:
    """One session's cache on this stream."""

    max_length: int
    handles: Sequence[Sequence[Any]]  # per block, its cache handles
    deadline: float  # monotonic seconds: after this, the session is closed (the server's session timeout)
    exit_stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    prefix_length: int = 0


class GroupedStream:
    """The sessions of one grouped stream on a connection handler, and how each request is served."""

    def __init__(self, handler: Any, clock=time.monotonic) -> None:
        self._handler = handler
        self._clock = clock
        self._uid: str | None = None
        self._uids: tuple[str, ...] = ()
        self._backends: tuple[Any, ...] = ()
        self._sessions: dict[int, _Session] = {}

    @property
    def output_compression(self) -> int:
        return self._output_schema().compression if self._backends else 0

    async def serve(self, request: GroupRequest) -> GroupResponse:
        """Close, open, then step what ``request`` says; ValueError if it names another span."""
        self._bind(request.uid)
        for key in request.closes:
            await self._close(key)
        failed: dict[int, str] = {}
        for key, max_length in request.opens.items():
            try:
                self._sessions[key] = await self._open(key, max_length)
            except Exception as error:  # no room, a bad length: this session alone fails
                failed[key] = f"cannot open a session: {error}"
        if not request.steps:
            return GroupResponse(None, failed)
        outputs = await self._step(request, failed)
        return GroupResponse(outputs.to(self._output_schema().dtype), failed)

    async def close(self) -> None:
        """Free every session's cache (the stream ended)."""
        for key in list(self._sessions):
            await self._close(key)

    def _bind(self, uid: str) -> None:
        if self._uid is None:
            self._uids = tuple(self._handler._check_uids(uid))
            self._backends = tuple(self._handler.module_backends[block] for block in self._uids)
            self._uid = uid
        elif uid != self._uid:
            raise ValueError("a grouped inference stream serves one span of blocks")

    async def _open(self, key: int, max_length: int) -> _Session:
        if key in self._sessions:
            raise ValueError(f"session {key} is open already")
        if not 0 < max_length <= self._handler.inference_max_length:
            limit = self._handler.inference_max_length
            raise ValueError(f"cannot allocate a cache of {max_length} tokens, max {limit}")
        exit_stack = contextlib.AsyncExitStack()
        allocation = self._handler._allocate_cache(self._backends, batch_size=1, max_length=max_length, timeout=0.0)
        handles = await exit_stack.enter_async_context(allocation)
        return _Session(max_length, handles, self._clock() + self._handler.session_timeout, exit_stack)

    async def _close(self, key: int) -> None:
        session = self._sessions.pop(key, None)
        if session is not None:
            await session.exit_stack.aclose()

    async def _step(self, request: GroupRequest, failed: dict[int, str]) -> torch.Tensor:
        assert request.hidden is not None
        hidden = request.hidden.to(self._backends[0].dtype)
        outputs = torch.zeros_like(hidden)
        starts, offset = {}, 0
        for step in request.steps:
            starts[step.key], offset = offset, offset + step.length
        ready = [step for step in request.steps if step.key not in failed and self._admit(step, failed)]
        limit = self._merge_limit()
        short = [step for step in ready if step.length <= limit]
        jobs = [self._long_step(step, hidden[starts[step.key] : starts[step.key] + step.length]) for step in ready
                if step.length > limit]  # fmt: skip
        if short:
            rows = torch.cat([hidden[starts[step.key] : starts[step.key] + step.length] for step in short])
            jobs.append(self._batched(short, rows))
        for result in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result  # a bug of this module, not a session's: the stream fails
            for step, rows, why in result:
                if why is not None:
                    failed[step.key] = why
                    continue
                outputs[starts[step.key] : starts[step.key] + step.length] = rows
                self._sessions[step.key].prefix_length += step.length
        return outputs

    def _admit(self, step: GroupStep, failed: dict[int, str]) -> bool:
        session = self._sessions.get(step.key)
        if session is None:
            failed[step.key] = f"no session {step.key} on this stream"
        elif self._clock() > session.deadline:
            failed[step.key] = "the session timed out"
        elif session.prefix_length + step.length > session.max_length:
            failed[step.key] = (f"Maximum length exceeded: prefix {session.prefix_length} + current {step.length}"
                                f" exceeds pre-allocated maximum {session.max_length}")  # fmt: skip
        else:
            return True
        return False

    def _infos(self, session: _Session, blocks: slice = slice(None)) -> tuple[Any, ...]:
        from petals.data_structures import InferenceMetadata

        pairs = list(zip(self._uids, session.handles, strict=True))[blocks]
        prefix = session.prefix_length
        return tuple(InferenceMetadata(uid, prefix, tuple(handles), NO_ADAPTER) for uid, handles in pairs)

    async def _batched(self, steps: list[GroupStep], hidden: torch.Tensor) -> list[tuple[GroupStep, Any, str | None]]:
        """The steps as one pool task: ``hidden`` ``[rows, hidden]``, each step's rows after the previous'."""
        lengths = tuple(step.length for step in steps)
        rows = GroupedRows(tuple(self._infos(self._sessions[step.key]) for step in steps), lengths)
        priority = self._priority(hidden)
        try:
            outputs, failed = await self._pool().submit_task(hidden[:, None], rows, priority=priority)
        except Exception as error:
            return [(step, None, f"the server's step failed: {error!r}") for step in steps]
        ends = itertools.accumulate(lengths)
        return [(step, outputs[end - step.length : end, 0], "the server's step failed" if failed[index] else None)
                for index, (step, end) in enumerate(zip(steps, ends, strict=True))]  # fmt: skip

    async def _long_step(self, step: GroupStep, hidden: torch.Tensor) -> list[tuple[GroupStep, Any, str | None]]:
        """A step longer than the short-inference limit through Petals' own step, block by block, as
        ``iterate_rpc_inference`` runs it."""
        from petals.utils.misc import DUMMY_INT64

        session = self._sessions[step.key]
        states, priority = hidden[None], self._priority(hidden)
        try:
            for index, backend in enumerate(self._backends):
                infos = self._infos(session, slice(index, index + 1))
                pool = backend.inference_pool
                (states,) = await pool.submit_task(states, DUMMY_INT64, infos, None, priority=priority)
        except Exception as error:
            return [(step, None, f"the server's step failed: {error!r}")]
        return [(step, states[0], None)]

    def _merge_limit(self) -> int:
        """Petals' short-inference limit: longer steps run block by block, letting other steps in between."""
        from petals.server.block_functions import MAX_NF4_SHORT_INFERENCE_TOKENS, MAX_SHORT_INFERENCE_TOKENS
        from petals.utils.convert_block import QuantType

        nf4 = self._handler.quant_type == QuantType.NF4
        return MAX_NF4_SHORT_INFERENCE_TOKENS if nf4 else MAX_SHORT_INFERENCE_TOKENS

    def _pool(self) -> Any:
        return self._backends[0].inference_pool

    def _priority(self, hidden: torch.Tensor) -> float:
        from petals.utils.misc import DUMMY_INT64

        return self._handler._prioritizer.prioritize(hidden, DUMMY_INT64, points=0.0, requested_uids=self._uids,
                                                     type="inference")  # fmt: skip

    def _output_schema(self) -> Any:
        from hivemind.utils.nested import nested_flatten

        return next(iter(nested_flatten(self._backends[-1].outputs_schema)))


async def rpc_inference_group(
    self: Any, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    """Serve one grouped inference stream (module docstring); ``self`` is Petals' connection handler."""
    stream = GroupedStream(self)
    try:
        while True:
            try:
                message = await asyncio.wait_for(anext(requests), self.step_timeout)
            except (TimeoutError, StopAsyncIteration):
                return
            if not message.uid:
                return  # the client's end of the stream
            response = await stream.serve(GroupRequest.from_message(message))
            yield response.to_message(stream.output_compression)
    finally:
        await stream.close()


def check() -> None:
    """Raise PatchError unless Petals' connection handler is the one this stream is added to."""
    for dist in ("petals", "hivemind"):
        require_version(dist, PATCHED_VERSIONS[dist], PATCH)
    from petals.server.handler import TransformerConnectionHandler

    require_attributes(TransformerConnectionHandler, (
        "rpc_inference", "_allocate_cache", "_check_uids", "_rpc_handlers",
    ), PATCH)  # fmt: skip
    if getattr(TransformerConnectionHandler, METHOD, rpc_inference_group) is not rpc_inference_group:
        raise PatchError(PATCH, f"TransformerConnectionHandler.{METHOD}, which Petals has now")


def install() -> None:
    """Add ``rpc_inference_group`` to Petals' connection handler (before any handler registers)."""
    check()
    from petals.server.handler import TransformerConnectionHandler

    setattr(TransformerConnectionHandler, METHOD, rpc_inference_group)
    TransformerConnectionHandler._rpc_handlers = None  # collected again, with the new method
