"""The replica's grouped sessions (services/inference/grouped_sessions.py) against a fake server stream:
steps that come while a request is out go together in the next one, a server's failure is its session's,
a broken stream fails what it carried and is replaced, closes ride with the next request, the stream ends
with its last session, and a server without the stream gets Petals' own sessions."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from services.common.p2p.grouped_steps import GroupRequest, GroupResponse
from services.inference import grouped_sessions
from services.inference.grouped_sessions import GroupChannel, GroupStepFailed, ServerSessionFactory
from tests.unit.fences import assert_refused, pretend_version, refusal

UID = "model.0 model.1"
CONFIG = SimpleNamespace(request_timeout=5.0, connect_timeout=5.0)
RPC_INFO = {"inference_schema": ((SimpleNamespace(compression=0),), {})}


class FakeServer:
    """A peer answering the grouped stream: outputs are inputs times 2; ``gate`` holds each answer to
    steps while cleared; ``fail_keys`` are answered as failed; ``break_on`` (a request's number) breaks it."""

    def __init__(self, supported: bool = True) -> None:
        self.supported = supported
        self.requests: list[GroupRequest] = []
        self.streams = self.ended = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_keys: set[int] = set()
        self.break_on: int | None = None

    async def iterate_protobuf_handler(self, peer_id, name, requests, output_type):
        self.streams += 1

        async def answers():
            async for message in requests:
                if not self.supported:
                    raise ConnectionError("protocol not supported")
                if not message.uid:
                    self.ended += 1
                    return
                request = GroupRequest.from_message(message)
                self.requests.append(request)
                if request.steps:
                    await self.gate.wait()
                if len(self.requests) == self.break_on:
                    raise ConnectionResetError("the server went away")
                outputs = None if request.hidden is None else request.hidden * 2
                failed = {step.key: "no room" for step in request.steps if step.key in self.fail_keys}
                yield GroupResponse(outputs, failed).to_message()

        return answers()

    def stepped(self) -> list[list[int]]:
        """Each request's steps' keys, the greeting's (none) left out."""
        return [[step.key for step in request.steps] for request in self.requests if request.steps]


def channel_of(server: FakeServer, observed: list[int] | None = None) -> GroupChannel:
    observe = (observed if observed is not None else []).append
    return GroupChannel(server, "peer", UID, 0, CONFIG, observe)


def test_steps_that_come_while_a_request_is_out_go_together_in_the_next():
    server, observed = FakeServer(), []

    async def run():
        channel = channel_of(server, observed)
        server.gate.clear()
        first = asyncio.ensure_future(channel.step(0, torch.ones(3, 2), 32))
        while len(server.requests) < 2:  # the greeting, then the first step, held
            await asyncio.sleep(0.01)
        others = [asyncio.ensure_future(channel.step(key, torch.full((1, 2), float(key)), 32)) for key in (1, 2)]
        await asyncio.sleep(0.05)
        server.gate.set()
        return await first, await asyncio.gather(*others)

    first, others = asyncio.run(run())
    assert server.stepped() == [[0], [1, 2]]
    assert server.requests[1].opens == {0: 32} and server.requests[2].opens == {1: 32, 2: 32}
    torch.testing.assert_close(first, torch.ones(3, 2) * 2)
    torch.testing.assert_close(others[1], torch.full((1, 2), 4.0))
    assert observed == [1, 2]


def test_a_step_waits_for_the_sessions_answered_with_it_and_goes_with_them():
    server = FakeServer()

    async def run():
        channel = channel_of(server)
        await asyncio.gather(*(channel.step(key, torch.ones(1, 2), 8, ((channel, key),)) for key in (0, 1, 2)))
        channel.forget(2)  # its generation ended: not waited for
        first = asyncio.ensure_future(channel.step(0, torch.ones(1, 2), None, ((channel, 0),)))
        await asyncio.sleep(0.05)
        sent_before_the_second = len(server.stepped())
        await asyncio.gather(first, channel.step(1, torch.ones(1, 2), None, ((channel, 1),)))
        return sent_before_the_second

    assert asyncio.run(run()) == 1
    assert server.stepped() == [[0, 1, 2], [0, 1]]


def test_a_step_that_finds_nobody_expected_goes_at_once_and_a_late_session_stops_holding_others():
    server = FakeServer()

    async def run():
        channel = channel_of(server)
        channel._gathering._limit_s = 0.05
        await asyncio.gather(*(channel.step(key, torch.ones(1, 2), 8, ((channel, key),)) for key in (0, 1)))
        await channel.step(0, torch.ones(1, 2), None, ((channel, 0),))  # waits out session 1's limit: it is slow
        started = asyncio.get_running_loop().time()
        await channel.step(0, torch.ones(1, 2), None, ((channel, 0),))  # session 1 is no longer waited for
        return asyncio.get_running_loop().time() - started

    assert asyncio.run(run()) < 0.04
    assert server.stepped() == [[0, 1], [0], [0]]


def test_a_step_the_server_fails_fails_alone():
    server = FakeServer()
    server.fail_keys = {1}

    async def run():
        channel = channel_of(server)
        steps = (channel.step(key, torch.ones(1, 2), 8) for key in range(3))
        return await asyncio.gather(*steps, return_exceptions=True)

    results = asyncio.run(run())
    assert isinstance(results[1], GroupStepFailed) and "no room" in str(results[1])
    torch.testing.assert_close(results[0], torch.ones(1, 2) * 2)
    torch.testing.assert_close(results[2], torch.ones(1, 2) * 2)


def test_a_broken_stream_fails_what_it_carried_and_what_comes_after_and_a_new_channel_replaces_it():
    server = FakeServer()
    server.break_on = 3  # the greeting, one step, then the stream breaks
    factory = ServerSessionFactory(stock=None)
    span = SimpleNamespace(peer_id="peer")

    async def run():
        channel = factory._channel(server, span, UID, RPC_INFO, CONFIG)
        await channel.step(0, torch.ones(1, 2), 8)
        broken = await asyncio.gather(channel.step(0, torch.ones(1, 2), None), return_exceptions=True)
        later = await asyncio.gather(channel.step(1, torch.ones(1, 2), 8), return_exceptions=True)
        return channel, broken[0], later[0], factory._channel(server, span, UID, RPC_INFO, CONFIG)

    channel, broken, later, replacement = asyncio.run(run())
    assert isinstance(broken, GroupStepFailed) and "went away" in str(broken)
    assert isinstance(later, GroupStepFailed) and channel.broken is not None
    assert replacement is not channel and replacement.broken is None


def test_closes_ride_with_the_next_request_and_the_stream_ends_with_its_last_session():
    server = FakeServer()

    async def run():
        channel = channel_of(server)
        await asyncio.gather(channel.step(0, torch.ones(1, 2), 8), channel.step(1, torch.ones(1, 2), 8))
        channel.close_session(0)
        await channel.step(1, torch.ones(1, 2), None)
        channel.close_session(1)
        channel.close_session(7)  # never opened: nothing to send
        while server.ended == 0:
            await asyncio.sleep(0.01)
        ended = server.ended
        await channel.step(2, torch.ones(1, 2), 8)  # a new session opens a new stream
        return ended

    assert asyncio.run(run()) == 1
    closes = [request.closes for request in server.requests if request.closes]
    assert closes == [(0,), (1,)]
    assert server.streams == 2


def test_a_server_without_the_stream_gets_petals_own_sessions_and_is_asked_again_later():
    server, now = FakeServer(supported=False), [0.0]
    stock_sessions = []

    class Stock:
        @staticmethod
        async def create(config, p2p, span, uid, rpc_info, **metadata):
            stock_sessions.append(metadata)
            return "stock session"

    factory = ServerSessionFactory(Stock, clock=lambda: now[0])
    span = SimpleNamespace(peer_id="peer")

    async def create():
        return await factory.create(CONFIG, server, span, UID, RPC_INFO, max_length=8, points=0)

    assert asyncio.run(create()) == "stock session" and server.streams == 1
    assert asyncio.run(create()) == "stock session" and server.streams == 1  # not asked again so soon
    now[0] += grouped_sessions.UNSUPPORTED_RETRY_S + 1
    server.supported = True
    session = asyncio.run(create())
    assert isinstance(session, grouped_sessions.GroupedServerSession) and server.streams == 2
    assert len(stock_sessions) == 2


def test_a_replayed_session_sends_its_whole_history_once_then_only_new_positions():
    """Petals hands a replacement session the failed one's history, the failed step's inputs included."""
    from petals.utils.misc import DUMMY, DUMMY_INT64

    server = FakeServer()
    session = grouped_sessions.GroupedServerSession(channel_of(server), SimpleNamespace(start=0), UID, 16)
    session.history = torch.arange(6, dtype=torch.float32).view(1, 3, 2)
    replayed = session.step(session.history[:, -1:], DUMMY, DUMMY_INT64, step_id="retry")
    torch.testing.assert_close(replayed, torch.arange(6, dtype=torch.float32).view(1, 3, 2) * 2)
    following = session.step(torch.ones(1, 1, 2), DUMMY, DUMMY_INT64, step_id="next")
    torch.testing.assert_close(following, torch.ones(1, 1, 2) * 2)
    assert [[step.length for step in request.steps] for request in server.requests if request.steps] == [[3], [1]]
    assert session.history.shape == (1, 4, 2)  # ready for another replay


def test_a_grouped_session_refuses_what_only_petals_own_step_does():
    from petals.utils.misc import DUMMY, DUMMY_INT64

    session = grouped_sessions.GroupedServerSession(channel_of(FakeServer()), SimpleNamespace(start=0), UID, 8)
    with pytest.raises(ValueError, match="one sequence"):
        session.step(torch.ones(2, 1, 2), DUMMY, DUMMY_INT64, step_id="a")
    with pytest.raises(ValueError, match="beam hypotheses"):
        session.step(torch.ones(1, 1, 2), DUMMY, torch.tensor([0]), step_id="b")


def test_the_grouped_sessions_fence_fits_the_installed_libraries():
    grouped_sessions.check()


@pytest.mark.parametrize("dist", sorted(grouped_sessions.PATCHED_VERSIONS))
def test_the_grouped_sessions_fence_refuses_another_version_in_one_line(monkeypatch, dist):
    pretend_version(monkeypatch, dist)
    expected = refusal(grouped_sessions.PATCH, dist, grouped_sessions.PATCHED_VERSIONS[dist])
    assert_refused(grouped_sessions.check, expected)


def test_a_route_expects_each_session_at_its_next_span_and_its_first_span_expects_it_throughout():
    first_channel, last_channel = channel_of(FakeServer()), channel_of(FakeServer())
    first = grouped_sessions.GroupedServerSession(first_channel, SimpleNamespace(start=0), UID, 8)
    last = grouped_sessions.GroupedServerSession(last_channel, SimpleNamespace(start=2), UID, 8)
    first.next_session = last

    assert first._expected_at() == ((last_channel, last._key), (first_channel, first._key))
    assert last._expected_at() == ((first_channel, first._key),)  # the first span's step made it the route's head
    last.closed = True
    assert first._expected_at() == ((first_channel, first._key),)
    alone = grouped_sessions.GroupedServerSession(last_channel, SimpleNamespace(start=0), UID, 8)
    assert alone._expected_at() == ((last_channel, alone._key),)  # one span: it comes back to it


def test_a_request_carries_at_most_max_sessions_and_the_others_go_next():
    server = FakeServer()

    async def run():
        channel = GroupChannel(server, "peer", UID, 0, CONFIG, lambda sessions: None, max_sessions=2)
        await asyncio.gather(*(channel.step(key, torch.ones(1, 2), 8) for key in range(5)))

    asyncio.run(run())
    assert server.stepped() == [[0, 1], [2, 3], [4]]


def test_a_generation_that_ended_is_no_longer_waited_for_on_any_span():
    import time

    channels = [channel_of(FakeServer()), channel_of(FakeServer())]
    sessions = [
        grouped_sessions.GroupedServerSession(channel, SimpleNamespace(start=0), UID, 8) for channel in channels
    ]
    for session in sessions:
        session._channel._gathering.expect(session._key, 0.0)
    petals_session = SimpleNamespace(_server_sessions=[*sessions, object()])  # a stock session among them

    grouped_sessions.generation_ended(petals_session)  # on hivemind's event loop, without waiting

    deadline = time.monotonic() + 5.0
    while any(channel._gathering.wait_until(0.0) for channel in channels) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [channel._gathering.wait_until(0.0) for channel in channels] == [None, None]
