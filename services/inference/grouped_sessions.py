"""Grouped steps on the replica (REPLICA_STEP_BATCHING, on by default): all its sessions' steps
through a server span in one request, installed before the model loads.

Petals' client opens one ``rpc_inference`` stream per session and server span and sends each step
on it: with 16 chats and two servers, 32 requests per token step, each costing the server (and
this client) milliseconds of CPU outside the blocks' compute, and each reaching the server on its
own, so the server's batched passes stay small. Where a server answers the grouped inference stream
(services/common/p2p/grouped_steps.py: ours with SWARM_BATCHING on), this module sends the steps of
every session of the process on that span through one ``GroupChannel``:

- no fixed waiting window: a step that finds the channel idle, and no other session on its way, is
  sent at once, alone; steps that come while a request is out are sent together in the next one,
  when its answer is back (as the LM head batches, services/inference/head_batching.py), at most
  ``max_sessions`` (REPLICA_STEP_BATCH_SESSIONS) per request. Only sessions known to be on their way
  are waited for (services/inference/step_gathering.py), until their generation ends: at a span,
  those the span before just answered; at the route's first span, every session it answered,
  wherever it is now.
  So sessions that step together stay in one request, and groups that drifted apart merge, up to
  ``max_sessions``; beyond it, the requests of several groups follow each other through the servers;
- Petals' ``InferenceSession`` is unchanged: it still routes each session, keeps its inputs for a
  replay and re-routes it when a step fails. Only the per-server session it creates
  (``_ServerInferenceSession``) is a ``GroupedServerSession`` where the server supports it;
- a step the server answers as failed fails its session's step alone; a stream that breaks fails
  every step in it, and Petals then re-routes each session and replays it, as for a stock server;
- a server without the stream (stock Petals, or ours with batching off) gets Petals' own sessions;
  it is asked again after ``UNSUPPORTED_RETRY_S``.

Fenced to petals 2.2.0.post1 and hivemind 1.1.11 (``check``; docs/patches.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch

from services.common.p2p.grouped_steps import METHOD, GroupRequest, GroupResponse, GroupStep
from services.common.startup.patching import require_attributes, require_parameters, require_version
from services.inference.step_gathering import StepGathering

logger = logging.getLogger(__name__)
PATCH = "grouped_sessions"
PATCHED_VERSIONS = {"petals": "2.2.0.post1", "hivemind": "1.1.11"}
UNSUPPORTED_RETRY_S = 60.0  # a server that lacks the grouped stream is asked again after this
FINISH_TIMEOUT_S = 5.0
MAX_SESSIONS = 16  # sessions' steps in one request at most (REPLICA_STEP_BATCH_SESSIONS)
_installed = False


Expected = tuple["GroupChannel", int]  # a channel, and the session's key on it


class GroupStepFailed(RuntimeError):
    """A grouped step that did not run: the server's answer for it, or the stream's failure."""


@dataclass
class _Waiting:
    """A step waiting to be sent or answered."""

    key: int
    rows: torch.Tensor  # [length, hidden]
    max_length: int | None  # the session's first step: open it with this cache size
    future: asyncio.Future
    expected_at: tuple[Expected, ...]  # where to expect the session once it is answered


class GroupChannel:
    """One grouped stream to one server span, for every session of this process on it; used only on
    hivemind's event loop (``RemoteExpertWorker``), so it needs no locks."""

    def __init__(
        self,
        p2p: Any,
        peer_id: Any,
        uid: str,
        compression: int,
        config: Any,
        observe: Callable[[int], None],
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        """``observe`` is told how many sessions' steps each request carries; one carries at most
        ``max_sessions``."""
        self._p2p, self._peer_id, self._uid = p2p, peer_id, uid
        self._compression, self._observe, self._max_sessions = compression, observe, max_sessions
        self._request_timeout, self._connect_timeout = config.request_timeout, config.connect_timeout
        self._keys = itertools.count()
        self._waiting: list[_Waiting] = []
        self._closes: list[int] = []
        self._open: set[int] = set()  # sessions opened on the server (or being opened)
        self._gathering = StepGathering()
        self._arrival = asyncio.Event()  # set when a step comes or an expected session is forgotten
        self._running = False
        self._pump_task: asyncio.Future | None = None
        self._connecting: asyncio.Future | None = None
        self._inputs: asyncio.Queue | None = None
        self._outputs: AsyncIterator[Any] | None = None
        self.broken: BaseException | None = None  # set when the stream failed: the server dropped its sessions

    def new_key(self) -> int:
        return next(self._keys)

    async def connect(self) -> None:
        """Open the stream unless it is open; raises what opening it raised (a server without it)."""
        if self._outputs is not None:
            return
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open_stream())
        try:
            await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def step(
        self, key: int, rows: torch.Tensor, max_length: int | None, expected_at: tuple[Expected, ...] = ()
    ) -> torch.Tensor:
        """Session ``key``'s output rows for its input ``rows`` ``[length, hidden]``; ``max_length`` on its
        first step; ``expected_at``: the channels (and the session's keys there) that expect the session once
        this step is answered. Raises GroupStepFailed."""
        if self.broken is not None:
            raise GroupStepFailed(f"the grouped inference stream failed: {self.broken!r}")
        loop = asyncio.get_running_loop()
        self._gathering.arrived(key, loop.time())
        self._waiting.append(_Waiting(key, rows, max_length, loop.create_future(), expected_at))
        self._arrival.set()
        self._kick()
        return await self._waiting[-1].future

    def expect(self, key: int) -> None:
        """Session ``key`` is on its way: the next request waits for it (step_gathering.py)."""
        self._gathering.expect(key, asyncio.get_running_loop().time())

    def forget(self, key: int) -> None:
        """Session ``key`` will not step soon: no request waits for it."""
        self._gathering.forget(key)
        self._arrival.set()

    def close_session(self, key: int) -> None:
        """Free session ``key``'s cache on the server, with the next request."""
        self.forget(key)
        if key in self._open and self.broken is None:
            self._open.discard(key)
            self._closes.append(key)
            self._kick()

    def _kick(self) -> None:
        if not self._running:
            self._running = True
            self._pump_task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        try:
            while self.broken is None and (self._waiting or self._closes):
                await self._gather()
                batch, self._waiting = self._waiting[: self._max_sessions], self._waiting[self._max_sessions :]
                closes, self._closes = self._closes, []
                await self._exchange(batch, closes)
                if not self._open and not self._waiting and self.broken is None:
                    await self._finish()  # no session left: the stream ends, the next one opens another
        finally:
            self._running = False

    async def _gather(self) -> None:
        """Wait for the sessions expected here (step_gathering.py), as long as their limit allows, unless a
        full request's worth is already waiting."""
        loop = asyncio.get_running_loop()
        while len(self._waiting) < self._max_sessions and (until := self._gathering.wait_until(loop.time())):
            self._arrival.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrival.wait(), until - loop.time())

    async def _exchange(self, batch: list[_Waiting], closes: list[int]) -> None:
        opens = {waiting.key: waiting.max_length for waiting in batch if waiting.max_length is not None}
        self._open.update(opens)
        hidden = torch.cat([waiting.rows for waiting in batch]) if batch else None
        steps = tuple(GroupStep(waiting.key, len(waiting.rows)) for waiting in batch)
        request = GroupRequest(self._uid, opens, tuple(closes), steps, hidden)
        if steps:
            self._observe(len(steps))
        try:
            await self.connect()
            assert self._inputs is not None and self._outputs is not None
            await self._inputs.put(request.to_message(self._compression))
            message = await asyncio.wait_for(self._outputs.__anext__(), self._request_timeout)
            response = GroupResponse.from_message(message)
        except Exception as error:  # the stream is gone, and the server's sessions with it
            self._fail(error, batch)
            return
        start = 0
        for waiting in batch:
            end = start + len(waiting.rows)
            if waiting.future.done():
                pass  # its caller gave up (cancelled)
            elif waiting.key in response.failed:
                waiting.future.set_exception(GroupStepFailed(response.failed[waiting.key]))
            elif response.outputs is None or len(response.outputs) < end:
                waiting.future.set_exception(GroupStepFailed("the server's answer lacks this step's outputs"))
            else:
                for channel, key in waiting.expected_at:
                    channel.expect(key)
                waiting.future.set_result(response.outputs[start:end])
            start = end

    def _fail(self, error: BaseException, batch: list[_Waiting]) -> None:
        self.broken = error
        failure = GroupStepFailed(f"the grouped inference stream failed: {error!r}")
        for waiting in [*batch, *self._waiting]:
            if not waiting.future.done():
                waiting.future.set_exception(failure)
        self._waiting.clear()
        if self._inputs is not None:
            self._inputs.put_nowait(_end_message())

    async def _open_stream(self) -> None:
        """Open the stream and exchange an empty request on it: libp2p opens a stream before the server
        has agreed to the protocol, so only an answer shows that the server serves it."""
        from hivemind.proto import runtime_pb2
        from petals.server.handler import TransformerConnectionHandler

        handle = TransformerConnectionHandler._get_handle_name(None, METHOD)
        inputs: asyncio.Queue = asyncio.Queue()

        async def open_and_greet() -> AsyncIterator[Any]:
            outputs = await self._p2p.iterate_protobuf_handler(
                self._peer_id, handle, _read(inputs), runtime_pb2.ExpertResponse
            )
            inputs.put_nowait(GroupRequest(self._uid).to_message())
            await outputs.__anext__()
            return outputs

        try:
            outputs = await asyncio.wait_for(open_and_greet(), self._connect_timeout)
        except BaseException:
            inputs.put_nowait(_end_message())
            raise
        self._inputs, self._outputs = inputs, outputs

    async def _finish(self) -> None:
        inputs, outputs, self._inputs, self._outputs = self._inputs, self._outputs, None, None
        if inputs is None or outputs is None:
            return
        inputs.put_nowait(_end_message())
        with contextlib.suppress(StopAsyncIteration, Exception):  # ended, or gone: nothing of it is left
            await asyncio.wait_for(outputs.__anext__(), FINISH_TIMEOUT_S)


def _end_message() -> Any:
    from hivemind.proto import runtime_pb2

    return runtime_pb2.ExpertRequest()


async def _read(queue: asyncio.Queue) -> AsyncIterator[Any]:
    """The requests put on ``queue``, up to and with the empty one that ends the stream."""
    while True:
        message = await queue.get()
        yield message
        if not message.uid:
            return


class GroupedServerSession:
    """A session on one server span through a ``GroupChannel``: what Petals' ``InferenceSession`` uses of
    its ``_ServerInferenceSession`` (``span``, ``history``, ``next_session``, ``step``, the context)."""

    def __init__(self, channel: GroupChannel, span: Any, uid: str, max_length: int) -> None:
        self.span, self.uid = span, uid
        self.session_id = f"grouped-{id(self):x}"  # Petals' server-to-server pushes find no such session
        self.stepped = self.closed = False
        self.history: torch.Tensor | None = None  # the inputs so far, for a replay on another server
        self.next_session: Any = None
        self.route_head: GroupedServerSession | None = None  # the first span's session, where this one is the last
        self._position = 0
        self._channel, self._key, self._max_length = channel, channel.new_key(), max_length

    def step(
        self, inputs: torch.Tensor, prompts: torch.Tensor, hypo_ids: torch.Tensor, *, step_id: str
    ) -> torch.Tensor:
        """Send the new positions of ``inputs`` ``[1, length, hidden]`` (all of its history on the first step);
        return their outputs, shaped as what was sent. Unlike Petals' own session, a replay whose history
        already holds the failed step's inputs goes on ("Broken input cache" in Petals 2.2)."""
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
        from petals.utils.misc import is_dummy

        if self.closed:
            raise GroupStepFailed("the session is closed")
        if inputs.shape[0] != 1 or not is_dummy(prompts) or not is_dummy(hypo_ids):
            raise ValueError("a grouped session steps one sequence, without deep prompts or beam hypotheses")
        length = inputs.shape[1]
        if self.history is None:
            self.history = inputs
        elif self.history.shape[1] == self._position:
            self.history = torch.cat([self.history, inputs[:, -length:]], dim=1)
        sent = inputs[:, -length:] if self.stepped else self.history
        max_length = None if self.stepped else self._max_length
        self.stepped = True
        coroutine = self._channel.step(self._key, sent[0], max_length, self._expected_at())
        outputs = RemoteExpertWorker.run_coroutine(coroutine)
        self._position += sent.shape[1]  # a replay's first step holds its whole history, this step's inputs included
        return outputs[None]

    def _expected_at(self) -> tuple[Expected, ...]:
        """Where to expect this session once its step here is answered: at the next span; after the last
        span, at the route's first; and the first span expects it back from the moment it answers it, so
        that its requests gather every session of the process on the route, whichever span each is at."""
        if self.span.start == 0:
            last: Any = self
            while last.next_session is not None:
                last = last.next_session
            if isinstance(last, GroupedServerSession):
                last.route_head = self
        following = self.next_session if self.next_session is not None else self.route_head
        expected = [following] if isinstance(following, GroupedServerSession) else []
        if self.span.start == 0 and following is not self:
            expected.append(self)
        return tuple((session._channel, session._key) for session in expected if not session.closed)

    def close(self) -> None:
        """Free the session's cache on the server, without waiting (safe on any thread, the loop's too)."""
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):  # the process is shutting down: the server frees it with the stream
            RemoteExpertWorker.run_coroutine(_close(self._channel, self._key), return_future=True)

    def __enter__(self) -> GroupedServerSession:
        return self

    def __exit__(self, *exc_details: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


async def _close(channel: GroupChannel, key: int) -> None:
    channel.close_session(key)


async def _forget(expected: list[Expected]) -> None:
    for channel, key in expected:
        channel.forget(key)


def generation_ended(petals_session: Any) -> None:
    """Tell the channels of a Petals ``InferenceSession`` that it will not step until its next generation,
    so that no other session's step waits for it (a no-op for Petals' own server sessions; safe on any
    thread, without waiting)."""
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    expected = [(session._channel, session._key) for session in getattr(petals_session, "_server_sessions", ())
                if isinstance(session, GroupedServerSession)]  # fmt: skip
    if expected:
        with contextlib.suppress(Exception):  # the process is shutting down
            RemoteExpertWorker.run_coroutine(_forget(expected), return_future=True)


class ServerSessionFactory:
    """Stands in for Petals' ``_ServerInferenceSession`` class in ``petals.client.inference_session``:
    ``create`` makes a grouped session where the server answers the grouped stream, else Petals' own."""

    def __init__(
        self,
        stock: Any,
        observe: Callable[[int], None] = lambda sessions: None,
        clock=time.monotonic,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self.stock = stock
        self._observe, self._max_sessions = observe, max_sessions
        self._clock = clock
        self._channels: dict[tuple[int, Any, str], GroupChannel] = {}
        self._unsupported_until: dict[Any, float] = {}  # peer -> when to ask it again

    async def create(self, config: Any, p2p: Any, span: Any, uid: str, rpc_info: Any, **metadata: Any) -> Any:
        """A session on ``span``, as ``_ServerInferenceSession.create`` (run on hivemind's event loop)."""
        if metadata.get("active_adapter") or self._unsupported_until.get(span.peer_id, 0.0) > self._clock():
            return await self.stock.create(config, p2p, span, uid, rpc_info, **metadata)
        channel = self._channel(p2p, span, uid, rpc_info, config)
        try:
            await channel.connect()
        except Exception as error:
            logger.info("server %s has no grouped inference stream (%r): one stream per session", span.peer_id, error)
            self._unsupported_until[span.peer_id] = self._clock() + UNSUPPORTED_RETRY_S
            self._channels.pop((id(p2p), span.peer_id, uid), None)
            return await self.stock.create(config, p2p, span, uid, rpc_info, **metadata)
        return GroupedServerSession(channel, span, uid, metadata["max_length"])

    def _channel(self, p2p: Any, span: Any, uid: str, rpc_info: Any, config: Any) -> GroupChannel:
        key = (id(p2p), span.peer_id, uid)
        channel = self._channels.get(key)
        if channel is None or channel.broken is not None:
            compression = rpc_info["inference_schema"][0][0].compression
            channel = GroupChannel(p2p, span.peer_id, uid, compression, config, self._observe, self._max_sessions)
            self._channels[key] = channel
        return channel


def check() -> None:
    """Raise PatchError unless Petals' client creates its server sessions the way this module replaces."""
    for dist, version in PATCHED_VERSIONS.items():
        require_version(dist, version, PATCH)
    import petals.client.inference_session as inference_session
    from hivemind.p2p import P2P
    from petals.server.handler import TransformerConnectionHandler

    stock = inference_session._ServerInferenceSession
    stock = stock.stock if isinstance(stock, ServerSessionFactory) else stock
    require_attributes(stock, ("create",), PATCH)
    require_parameters(stock.create, ("config", "p2p", "span", "uid", "rpc_info"), PATCH)
    require_attributes(TransformerConnectionHandler, ("_get_handle_name",), PATCH)
    parameters = ("self", "peer_id", "name", "input", "output_protobuf_type")
    require_parameters(P2P.iterate_protobuf_handler, parameters, PATCH)


def install(observe: Callable[[int], None] = lambda sessions: None, max_sessions: int = MAX_SESSIONS) -> None:
    """Make Petals' ``InferenceSession`` create grouped server sessions where it can (idempotent);
    ``observe`` is told how many sessions' steps each grouped request carries (at most ``max_sessions``)."""
    global _installed
    if _installed:
        return
    check()
    import petals.client.inference_session as inference_session

    stock = inference_session._ServerInferenceSession
    inference_session._ServerInferenceSession = ServerSessionFactory(stock, observe, max_sessions=max_sessions)
    _installed = True
