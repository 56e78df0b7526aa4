"""The grouped inference stream's messages (services/common/p2p/grouped_steps.py) and its server side
(services/swarm/grouped_inference.py) on a fake connection handler: sessions opened, stepped and closed
under their keys, one-token steps sent to the pool as one task, longer ones alone, each failure its own
session's."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

import pytest
import torch
from hivemind import MSGPackSerializer
from hivemind.proto import runtime_pb2

from services.common.p2p.grouped_steps import METHOD, GroupRequest, GroupResponse, GroupStep
from services.swarm import grouped_inference
from services.swarm.batching_pool import GroupedRows
from tests.unit.fences import assert_refused, pretend_version, refusal

UID = "model.0 model.1"
HIDDEN = 4


def test_a_request_and_a_response_cross_the_wire_unchanged():
    hidden = torch.randn(4, HIDDEN)
    request = GroupRequest(UID, {7: 64}, (3,), (GroupStep(7, 3), GroupStep(2, 1)), hidden)
    wire = request.to_message().SerializeToString()
    received = GroupRequest.from_message(runtime_pb2.ExpertRequest.FromString(wire))
    assert (received.uid, received.opens, received.closes, received.steps) == (UID, {7: 64}, (3,), request.steps)
    torch.testing.assert_close(received.hidden, hidden)
    response = GroupResponse(hidden * 2, {2: "no room"})
    wire = response.to_message().SerializeToString()
    answered = GroupResponse.from_message(runtime_pb2.ExpertResponse.FromString(wire))
    assert answered.failed == {2: "no room"}
    torch.testing.assert_close(answered.outputs, hidden * 2)
    assert GroupRequest.from_message(GroupRequest(UID).to_message()) == GroupRequest(UID)


@pytest.mark.parametrize(
    ("metadata", "rows", "problem"),
    [
        ({"steps": [[1, 2]]}, 1, "the steps need 2 rows"),
        ({"steps": [[1, 1], [1, 1]]}, 2, "its own session"),
        ({"steps": [[1, 0]]}, 0, "at least one position"),
        ({"steps": [["x", 1]]}, 1, "malformed"),
        ({"open": [[1]]}, 0, "malformed"),
    ],
    ids=["rows", "twice", "empty-step", "key", "open"],
)
def test_a_malformed_request_is_refused_with_what_is_wrong(metadata, rows, problem):
    from hivemind import serialize_torch_tensor

    tensors = [serialize_torch_tensor(torch.zeros(rows, HIDDEN))] if rows else []
    message = runtime_pb2.ExpertRequest(uid=UID, tensors=tensors, metadata=MSGPackSerializer.dumps(metadata))
    with pytest.raises(ValueError, match=problem):
        GroupRequest.from_message(message)


class FakePool:
    """The merged pool as a handler's process sees it: one-token groups and Petals' steps, recorded;
    outputs are the inputs plus 1; ``failing_rows`` of a group are answered as failed."""

    def __init__(self) -> None:
        self.tasks: list[tuple] = []
        self.failing_rows: set[int] = set()

    async def submit_task(self, *args, priority: float = 0.0):
        self.tasks.append(args)
        if isinstance(args[1], GroupedRows):
            sessions = len(args[1].infos)
            return args[0] + 1, torch.tensor([session in self.failing_rows for session in range(sessions)])
        return (args[0] + 1,)


class FakeHandler:
    """What ``GroupedStream`` uses of Petals' connection handler."""

    def __init__(self) -> None:
        self.pool = FakePool()
        schema = SimpleNamespace(dtype=torch.float32, compression=0)
        backend = SimpleNamespace(dtype=torch.float32, inference_pool=self.pool, outputs_schema=(schema,))
        self.module_backends = {"model.0": backend, "model.1": backend}
        self.inference_max_length = 100
        self.session_timeout = 60.0
        self.quant_type = None
        self._prioritizer = SimpleNamespace(prioritize=lambda *args, **kwargs: 0.0)
        self.allocated: list[int] = []
        self.freed: list[int] = []

    def _check_uids(self, uid: str) -> tuple[str, ...]:
        return tuple(uid.split(" "))

    @contextlib.asynccontextmanager
    async def _allocate_cache(self, backends, *, batch_size: int, max_length: int, timeout: float):
        if max_length > 90:
            raise RuntimeError("not enough room")
        handle = len(self.allocated)
        self.allocated.append(handle)
        try:
            yield [(2 * handle, 2 * handle + 1) for _ in backends]
        finally:
            self.freed.append(handle)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def serve(stream, *requests: GroupRequest) -> list[GroupResponse]:
    async def run():
        return [await stream.serve(request) for request in requests]

    return asyncio.run(run())


def rows(*lengths: int) -> torch.Tensor:
    return torch.arange(sum(lengths) * HIDDEN, dtype=torch.float32).view(-1, HIDDEN)


def test_short_steps_go_to_the_pool_as_one_task_and_longer_ones_alone_block_by_block(monkeypatch):
    from petals.server import block_functions

    monkeypatch.setattr(block_functions, "MAX_SHORT_INFERENCE_TOKENS", 2)  # Petals' short-inference limit
    handler = FakeHandler()
    stream = grouped_inference.GroupedStream(handler)
    opening = rows(3, 1, 2)
    (first,) = serve(stream, GroupRequest(UID, {1: 20, 2: 20, 3: 20}, (), (GroupStep(1, 3), GroupStep(2, 1),
                                                                           GroupStep(3, 2)), opening))  # fmt: skip
    assert first.failed == {}
    torch.testing.assert_close(first.outputs[3:], opening[3:] + 1)
    torch.testing.assert_close(first.outputs[:3], opening[:3] + 2)  # one task per block, each adding 1
    ((hidden, grouped_rows),) = [task for task in handler.pool.tasks if isinstance(task[1], GroupedRows)]
    assert hidden.shape == (3, 1, HIDDEN) and grouped_rows.lengths == (1, 2)
    alone = [task for task in handler.pool.tasks if not isinstance(task[1], GroupedRows)]
    assert [(task[0].shape[1], task[2][0].uid) for task in alone] == [(3, "model.0"), (3, "model.1")]
    handler.pool.tasks.clear()
    decoding = rows(1, 1, 1)
    (second,) = serve(stream, GroupRequest(UID, {}, (), (GroupStep(3, 1), GroupStep(1, 1), GroupStep(2, 1)), decoding))
    torch.testing.assert_close(second.outputs, decoding + 1)
    ((hidden, grouped_rows),) = handler.pool.tasks
    assert hidden.shape == (3, 1, HIDDEN)
    assert [infos[0].prefix_length for infos in grouped_rows.infos] == [2, 3, 1]  # each session's own position
    assert grouped_rows.lengths == (1, 1, 1)
    assert [infos[1].uid for infos in grouped_rows.infos] == ["model.1"] * 3


def test_each_failure_is_its_own_sessions_and_the_others_are_done():
    handler, clock = FakeHandler(), Clock()
    stream = grouped_inference.GroupedStream(handler, clock)
    serve(stream, GroupRequest(UID, {1: 20, 2: 20, 3: 5}, (), (GroupStep(1, 1), GroupStep(2, 1), GroupStep(3, 5)),
                               rows(1, 1, 5)))  # fmt: skip
    handler.pool.failing_rows = {1}
    steps = (GroupStep(1, 1), GroupStep(2, 1), GroupStep(3, 1), GroupStep(4, 1), GroupStep(5, 1))
    (response,) = serve(stream, GroupRequest(UID, {5: 95}, (), steps, rows(1, 1, 1, 1, 1)))
    assert set(response.failed) == {2, 3, 4, 5}
    assert "failed" in response.failed[2]  # its row of the pass
    assert "Maximum length exceeded" in response.failed[3]
    assert "no session 4" in response.failed[4]
    assert "not enough room" in response.failed[5]
    torch.testing.assert_close(response.outputs[0], rows(1, 1, 1, 1, 1)[0] + 1)
    assert response.outputs[1:].abs().sum() == 0
    clock.now = handler.session_timeout + 1
    handler.pool.failing_rows = set()
    (late,) = serve(stream, GroupRequest(UID, {}, (), (GroupStep(1, 1),), rows(1)))
    assert late.failed == {1: "the session timed out"}


def test_closing_frees_a_sessions_cache_and_the_end_of_the_stream_frees_the_rest():
    handler = FakeHandler()
    stream = grouped_inference.GroupedStream(handler)
    freed = []

    async def run():  # one event loop, as a handler's: its end would finalize every open cache
        await stream.serve(GroupRequest(UID, {1: 20, 2: 20}))
        await stream.serve(GroupRequest(UID, {}, (1, 9)))
        freed.append(list(handler.freed))
        await stream.close()

    asyncio.run(run())
    assert freed == [[0]] and handler.freed == [0, 1]


def test_a_stream_serves_one_span():
    stream = grouped_inference.GroupedStream(FakeHandler())
    serve(stream, GroupRequest(UID))
    with pytest.raises(ValueError, match="one span"):
        serve(stream, GroupRequest("model.1"))


def test_install_adds_the_stream_to_petals_handler_beside_its_own(monkeypatch):
    from petals.server.handler import TransformerConnectionHandler as Handler

    monkeypatch.setattr(Handler, METHOD, None, raising=False)
    monkeypatch.delattr(Handler, METHOD)
    monkeypatch.setattr(Handler, "_rpc_handlers", None)
    grouped_inference.install()
    Handler._collect_rpc_handlers()
    handlers = {handler.method_name: handler for handler in Handler._rpc_handlers}
    assert handlers[METHOD].stream_input and handlers[METHOD].stream_output  # hivemind serves it as a stream
    assert "rpc_inference" in handlers and "rpc_push" in handlers


def test_the_grouped_inference_fence_fits_the_installed_libraries():
    grouped_inference.check()


@pytest.mark.parametrize("dist", ["petals", "hivemind"])
def test_the_grouped_inference_fence_refuses_another_version_in_one_line(monkeypatch, dist):
    pretend_version(monkeypatch, dist)
    expected = refusal(grouped_inference.PATCH, dist, grouped_inference.PATCHED_VERSIONS[dist])
    assert_refused(grouped_inference.check, expected)
