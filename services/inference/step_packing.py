"""Cheaper packing of the Petals 2.2 client's inference requests, installed before the model loads.

Every step of a session sends each server a request with three tensors: the hidden states, the
deep prompts and the hypothesis ids. Unless a caller passes prompts or beam hypotheses (this
service never does), the last two are Petals' empty dummies. For each of them, on every step and
for every server, ``_ServerInferenceSession.step`` walks the arguments (``pack_args_kwargs``),
builds a ``BatchTensorDescriptor`` (only its dtype and compression are read), and serializes
the tensor into a new protobuf message. That was about 55 us of CPU per server per step on this
project's 2-core machine; with two servers, the client used 3-14 % less CPU per token without it
(``python -m bench.client_step``; docs/benchmarks.md).

The three replacements in ``petals.client.inference_session`` produce the same requests, byte for
byte (tests/unit/test_step_packing.py):

- ``pack_args_kwargs``: three distinct tensors and no keyword arguments always pack to the same
  structure, so it is returned as is; anything else takes Petals' own function;
- ``serialize_torch_tensor``: the message of an empty tensor depends only on its dtype, shape and
  compression, so it is built once (``ExpertRequest`` copies the messages it is given);
- ``BatchTensorDescriptor``: ``from_tensor`` returns just the dtype and compression.

The benchmarks' raw client (the bare library, the fair baseline) does not install it. Fenced to
petals 2.2.0.post1 (``check``; docs/patches.md).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from services.common.startup.patching import require_attributes, require_parameters, require_version

PATCH = "step_packing"
PATCHED_VERSION = "2.2.0.post1"  # petals
REPLACED = ("pack_args_kwargs", "serialize_torch_tensor", "BatchTensorDescriptor")
_installed = False


class StepTensorSchema(NamedTuple):
    """What ``_ServerInferenceSession.step`` reads of a tensor's ``BatchTensorDescriptor``."""

    dtype: Any
    compression: int

    @classmethod
    def from_tensor(cls, tensor: Any, compression: int = 0) -> StepTensorSchema:
        """As ``BatchTensorDescriptor.from_tensor``: the compression applies to floating-point tensors only."""
        return cls(tensor.dtype, compression if tensor.is_floating_point() else 0)  # 0: CompressionType.NONE


def check() -> None:
    """Raise PatchError unless ``petals.client.inference_session`` is the one these replacements fit."""
    require_version("petals", PATCHED_VERSION, PATCH)
    import petals.client.inference_session as inference_session

    require_attributes(inference_session, REPLACED, PATCH)
    require_parameters(inference_session.serialize_torch_tensor, ("tensor", "compression_type"), PATCH)
    require_attributes(inference_session.BatchTensorDescriptor, ("from_tensor",), PATCH)


def install() -> None:
    """Patch ``petals.client.inference_session``'s packing functions (idempotent); raises
    PatchError (``check``) where they do not fit."""
    global _installed
    if _installed:
        return
    check()
    import petals.client.inference_session as inference_session

    for name, replacement in replacements(inference_session).items():
        setattr(inference_session, name, replacement)
    _installed = True


def replacements(inference_session: Any) -> dict[str, Any]:
    """What ``install`` sets in the module ``petals.client.inference_session``: name -> replacement."""
    return {
        "pack_args_kwargs": _packer(inference_session.pack_args_kwargs),
        "serialize_torch_tensor": _serializer(inference_session.serialize_torch_tensor),
        "BatchTensorDescriptor": StepTensorSchema,
    }


def _packer(pack_args_kwargs: Any) -> Any:
    import torch

    def pack_three_tensors(*args: Any, **kwargs: Any) -> tuple[list[Any], Any]:
        if (
            not kwargs
            and len(args) == 3
            and all(type(arg) is torch.Tensor for arg in args)
            and len({id(arg) for arg in args}) == 3  # Petals sends a tensor passed twice once
        ):
            return list(args), ((b"__T0", b"__T1", b"__T2"), {})  # as pack_args_kwargs(t0, t1, t2) packs them
        return pack_args_kwargs(*args, **kwargs)

    return pack_three_tensors


def _serializer(serialize_torch_tensor: Any) -> Any:
    empty_messages: dict[tuple, Any] = {}  # (dtype, shape, compression) -> message; a race builds one twice

    def serialize(tensor: Any, compression_type: int = 0, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or tensor.numel() != 0 or tensor.requires_grad or not tensor.is_cpu:
            return serialize_torch_tensor(tensor, compression_type, *args, **kwargs)
        key = (tensor.dtype, tuple(tensor.shape), compression_type)
        message = empty_messages.get(key)
        if message is None:
            message = empty_messages[key] = serialize_torch_tensor(tensor, compression_type)
        return message

    return serialize
