"""Small tensors cross a Petals server's process boundaries by value, not through shared memory.

A Petals server is a main process (the runtime that runs the blocks) and forked connection
handlers. Every task's inputs, its outputs and its future's state travel between them through
``multiprocessing`` pickling, where torch's reducer moves each CPU tensor into a new shared-memory
file and the receiver maps it again (``share_memory_`` / ``rebuild_storage_filename``). For the
few-kilobyte hidden states of one decoding step that costs far more than the bytes themselves:
profiled under 16 sessions, it was about a third of a server's Python time, and pickling such
tensors by value cut the swarm's CPU per token by 11-35 % under 16-32 sessions (docs/benchmarks.md).

``install(limit_bytes)`` (called by services/swarm/serve.py before Petals starts, so the forks
inherit it) makes two changes in this process:

- multiprocessing's ``ForkingPickler`` sends a plain CPU tensor of at most ``limit_bytes`` that
  needs no gradient and is not already shared as its bytes; any other tensor (larger, on a GPU,
  already shared, requiring a gradient, a subclass) keeps torch's reducer;
- Petals' task pool no longer moves such small outputs into shared memory before sending them
  (``petals.server.task_pool._move_to_device_if_tensor``); the copy to the CPU stays blocking.

Fenced to petals 2.2.0.post1 (``check``; docs/patches.md).
"""

from __future__ import annotations

from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
import torch.multiprocessing.reductions as torch_reductions

from services.common.startup.patching import require_attributes, require_parameters, require_version

PATCH = "small_tensors"
PATCHED_VERSION = "2.2.0.post1"  # petals
LIMIT_ENV = "SWARM_SMALL_TENSOR_BYTES"
DEFAULT_LIMIT_BYTES = 1 << 20


def by_value(tensor: torch.Tensor, limit_bytes: int) -> bool:
    """Whether ``tensor`` is sent as its bytes rather than through torch's shared memory."""
    return (
        type(tensor) is torch.Tensor
        and tensor.device.type == "cpu"
        and tensor.layout == torch.strided
        and not tensor.requires_grad
        and not tensor.is_shared()
        and tensor.nbytes <= limit_bytes
    )


def rebuild(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor that ``reducer`` pickled as ``data`` (its contiguous bytes), ``dtype`` and ``shape``."""
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def reducer(limit_bytes: int) -> Callable[[torch.Tensor], tuple]:
    """A ``ForkingPickler`` reducer for ``torch.Tensor``: by value up to ``limit_bytes``, else torch's."""

    def reduce(tensor: torch.Tensor) -> tuple:
        if not by_value(tensor, limit_bytes):
            return torch_reductions.reduce_tensor(tensor)
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return rebuild, (data, tensor.dtype, tuple(tensor.shape))

    return reduce


def unshared_small_outputs(move: Callable[..., Any], limit_bytes: int) -> Callable[..., Any]:
    """Petals' ``_move_to_device_if_tensor`` that leaves a small output out of shared memory."""

    def move_to_device_if_tensor(arg: Any, device: torch.device | str, share_memory: bool = False) -> Any:
        if share_memory and isinstance(arg, torch.Tensor) and arg.nbytes <= limit_bytes:
            return arg.detach().to(device, non_blocking=False).requires_grad_(arg.requires_grad)
        return move(arg, device, share_memory)

    move_to_device_if_tensor.original = move
    return move_to_device_if_tensor


def check() -> None:
    """Raise PatchError unless Petals' task pool and torch's reducer are the ones this patch fits."""
    require_version("petals", PATCHED_VERSION, PATCH)
    import petals.server.task_pool as task_pool

    require_attributes(task_pool, ("_move_to_device_if_tensor",), PATCH)
    move = getattr(task_pool._move_to_device_if_tensor, "original", task_pool._move_to_device_if_tensor)
    require_parameters(move, ("arg", "device", "share_memory"), PATCH)
    require_attributes(torch_reductions, ("reduce_tensor",), PATCH)


def install(limit_bytes: int) -> None:
    """Send tensors of at most ``limit_bytes`` by value in this process and its forks; 0 changes
    nothing. Raises PatchError (``check``) where it does not fit."""
    if limit_bytes <= 0:
        return
    check()
    import petals.server.task_pool as task_pool

    ForkingPickler.register(torch.Tensor, reducer(limit_bytes))
    move = getattr(task_pool._move_to_device_if_tensor, "original", task_pool._move_to_device_if_tensor)
    task_pool._move_to_device_if_tensor = unshared_small_outputs(move, limit_bytes)
