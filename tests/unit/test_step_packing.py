"""services/inference/step_packing.py: the patched Petals client sends the very requests Petals does."""

from __future__ import annotations

import petals.client.inference_session as inference_session
import pytest
import torch
from hivemind import PeerID, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.tensor_descr import BatchTensorDescriptor
from petals.client.config import ClientConfig
from petals.data_structures import RemoteSpanInfo
from petals.utils.misc import DUMMY, DUMMY_INT64
from petals.utils.packaging import pack_args_kwargs

from services.inference import step_packing

NONE, FLOAT16 = runtime_pb2.CompressionType.NONE, runtime_pb2.CompressionType.FLOAT16
PEER = PeerID(b"\x00\x24\x08\x01\x12\x20" + bytes(range(32)))


class Server:
    """Stands in for the client's event-loop thread and a server: records each request, answers
    with hidden states of the input's shape."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []

    def run_coroutine(self, coroutine, return_future: bool = False):
        request = coroutine.cr_frame.f_locals["inputs_serialized"]
        coroutine.close()
        self.requests.append(request.SerializeToString(deterministic=True))
        inputs = deserialize_torch_tensor(request.tensors[0])
        return runtime_pb2.ExpertResponse(tensors=[serialize_torch_tensor(inputs + 1)])


def server_session(compression: int) -> inference_session._ServerInferenceSession:
    schema = (BatchTensorDescriptor(1, 8, compression=compression),) * 3
    session = inference_session._ServerInferenceSession(
        ClientConfig(), RemoteSpanInfo(PEER, 0, 2, None), "model.0 model.1", {"inference_schema": (schema, None)},
        None, None, max_length=16, points=0.0,
    )  # fmt: skip
    session.session_id = "a-fixed-session-id"
    next_session = inference_session._ServerInferenceSession(
        ClientConfig(), RemoteSpanInfo(PEER, 2, 4, None), "model.2 model.3", {"inference_schema": (schema, None)},
        None, None, max_length=16,
    )  # fmt: skip
    next_session.stepped, next_session.session_id = True, "the-next-session-id"
    session.next_session = next_session  # later steps name it (server-to-server)
    return session


def steps(dtype: torch.dtype, compression: int, prompts: torch.Tensor, hypo_ids: torch.Tensor) -> list[bytes]:
    """The requests three steps of one server session send: the prompt, then two tokens."""
    server = Server()
    original_worker = inference_session.RemoteExpertWorker.run_coroutine
    inference_session.RemoteExpertWorker.run_coroutine = server.run_coroutine
    try:
        session = server_session(compression)
        generator = torch.Generator().manual_seed(0)
        for step, tokens in enumerate((3, 1, 1)):
            inputs = torch.randn(1, tokens, 8, generator=generator).to(dtype)
            session.step(
                inputs, prompts[:, :, :tokens] if prompts.numel() else prompts, hypo_ids, step_id=f"step-{step}"
            )
    finally:
        inference_session.RemoteExpertWorker.run_coroutine = original_worker
    return server.requests


@pytest.fixture
def petals_functions(monkeypatch):
    """Petals' own packing functions, taken from the modules that define them (never patched), in
    the client module for the test and restored after it (install() patches that module)."""
    originals = {
        "pack_args_kwargs": pack_args_kwargs,
        "serialize_torch_tensor": serialize_torch_tensor,
        "BatchTensorDescriptor": BatchTensorDescriptor,
    }
    assert originals.keys() == step_packing.replacements(inference_session).keys()
    for name, function in originals.items():
        monkeypatch.setattr(inference_session, name, function)
    monkeypatch.setattr(step_packing, "_installed", False)
    return originals


@pytest.mark.parametrize(
    ("dtype", "compression", "prompts", "hypo_ids"),
    [
        (torch.float32, NONE, DUMMY, DUMMY_INT64),
        (torch.bfloat16, NONE, DUMMY, DUMMY_INT64),
        (torch.float32, FLOAT16, DUMMY, DUMMY_INT64),
        (torch.float32, NONE, torch.ones(2, 1, 3, 8), DUMMY_INT64),  # deep prompts: Petals' own path
        (torch.float32, NONE, DUMMY, torch.zeros(1, dtype=torch.int64)),  # beam hypotheses
    ],
    ids=["float32", "bfloat16", "float16-compression", "deep-prompts", "hypo-ids"],
)
def test_every_step_sends_the_bytes_petals_sends(petals_functions, dtype, compression, prompts, hypo_ids):
    expected = steps(dtype, compression, prompts, hypo_ids)
    step_packing.install()
    assert inference_session.BatchTensorDescriptor is step_packing.StepTensorSchema
    assert steps(dtype, compression, prompts, hypo_ids) == expected
    assert len(expected) == 3 and len(set(expected)) == 3


def test_install_is_idempotent(petals_functions):
    step_packing.install()
    patched = inference_session.pack_args_kwargs, inference_session.serialize_torch_tensor
    step_packing.install()
    assert (inference_session.pack_args_kwargs, inference_session.serialize_torch_tensor) == patched
    assert patched[0] is not petals_functions["pack_args_kwargs"]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((torch.ones(2), torch.zeros(0), torch.zeros(0, dtype=torch.int64)), {}),
        ((torch.ones(2), torch.ones(2), torch.zeros(0)), {}),
        ((DUMMY, DUMMY, DUMMY), {}),  # one tensor passed three times is sent once
        ((torch.ones(2), torch.zeros(0)), {}),
        ((torch.ones(2), None, torch.zeros(0)), {}),
        ((torch.ones(2), torch.zeros(0), torch.zeros(0)), {"mask": torch.ones(1)}),
        ((torch.nn.Parameter(torch.ones(2)), torch.zeros(0), torch.zeros(0)), {}),
    ],
)
def test_packing_matches_petals(args, kwargs):
    tensors, structure = step_packing._packer(pack_args_kwargs)(*args, **kwargs)
    expected_tensors, expected_structure = pack_args_kwargs(*args, **kwargs)
    assert structure == expected_structure
    assert [id(tensor) for tensor in tensors] == [id(tensor) for tensor in expected_tensors]


@pytest.mark.parametrize(
    "tensor",
    [torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bfloat16), torch.zeros(2, 0),
     torch.ones(3), torch.zeros(0, requires_grad=True)],
    ids=["float32", "int64", "bfloat16", "2-d", "not-empty", "requires-grad"],
)  # fmt: skip
@pytest.mark.parametrize("compression", [NONE, FLOAT16])
def test_serialized_messages_match_hivemind(tensor, compression):
    serialize = step_packing._serializer(serialize_torch_tensor)
    try:
        expected = serialize_torch_tensor(tensor, compression).SerializeToString(deterministic=True)
    except ValueError as error:  # float16 compression of an integer or bfloat16 tensor: the same refusal
        for _ in range(2):
            with pytest.raises(ValueError, match=str(error)):
                serialize(tensor, compression)
        return
    first, second = serialize(tensor, compression), serialize(tensor, compression)
    assert first.SerializeToString(deterministic=True) == second.SerializeToString(deterministic=True) == expected


def test_only_empty_tensors_reuse_a_message():
    serialize = step_packing._serializer(serialize_torch_tensor)
    assert serialize(DUMMY) is serialize(torch.zeros(0))
    assert serialize(DUMMY) is not serialize(DUMMY_INT64)
    assert serialize(torch.ones(1)) is not serialize(torch.ones(1))


@pytest.mark.parametrize("tensor", [torch.ones(1, 2, 3), torch.ones(1, 2, dtype=torch.int64), torch.zeros(0)])
@pytest.mark.parametrize("compression", [NONE, FLOAT16])
def test_the_schema_reads_as_hivemind_descriptor(tensor, compression):
    schema = step_packing.StepTensorSchema.from_tensor(tensor, compression)
    descriptor = BatchTensorDescriptor.from_tensor(tensor, compression)
    assert (schema.dtype, schema.compression) == (descriptor.dtype, descriptor.compression)
