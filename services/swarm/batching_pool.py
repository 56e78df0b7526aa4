"""Continuous batching of concurrent decoding steps on a Petals server (SWARM_BATCHING, on by default).

Petals' ``PrioritizedTaskPool`` hands its runtime one session's step at a time: under 16 sessions
every step reads all the server's block weights again. With batching on, the server's merged
inference pool is a ``BatchingTaskPool``: when the runtime takes a task that is a one-token decoding
step, every other step queued at that moment for the same span of blocks joins it (``take_group``),
and the group runs as one forward pass (services/swarm/batched_blocks.py), each session's cache
updated in place and each output sent back to its own session's future. There is no waiting
window: a step that finds nothing compatible queued runs alone through Petals' own step.

What batches (``decode_key``): one sequence, one new token, no deep prompts, dummy ``hypo_ids``, no
adapter, blocks this module can batch (Llama and BLOOM: ``batched_blocks.batchable_block``). Everything
else (prefills, prompt tuning, beam reordering, adapters, other families, tensor-parallel shards) runs
through Petals' own ``_MergedInferenceStep``, unchanged. A grouped stream's task (``GroupedRows``,
services/swarm/grouped_inference.py) brings several sessions' steps at once, prompts among them (each
session's new tokens as rows): it always runs as a batched pass, joined by the single steps queued for
its span, and its result says which of its sessions failed.

The runtime must take tasks when it is free, not ahead: ``runtime_args`` sets Petals'
``--prefetch_batches 0`` (its default 1 loads the next task, alone, while the current one runs).

``install()`` replaces ``petals.server.server.merge_inference_pools_inplace`` (the name Petals'
``ModuleContainer.create`` calls); ``check()`` fences it to petals 2.2.0.post1, hivemind 1.1.11 and
transformers 4.34.1 (docs/patches.md).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from services.common.startup.patching import require_attributes, require_methods, require_version
from services.swarm import batched_blocks, batching_metrics

PATCH = "batching_pool"
PATCHED_VERSIONS = {"petals": "2.2.0.post1", "hivemind": "1.1.11", "transformers": "4.34.1"}
ENV = "SWARM_BATCHING"


@dataclass(frozen=True)
class GroupedRows:
    """The second argument of a pool task that carries several sessions' steps at once (a grouped
    stream's, services/swarm/grouped_inference.py): its first argument is their new tokens' hidden
    states ``[rows, 1, hidden]``, session after session; this their block infos and how many rows each
    has. Its result is the rows' outputs and a bool per session, true where its step failed."""

    infos: tuple[tuple[Any, ...], ...]
    lengths: tuple[int, ...]


def decode_key(task_args: Sequence[Any], batchable_uids: frozenset[str]) -> Hashable | None:
    """The span of blocks of a task that can join a batched pass (a one-token decoding step, or a grouped
    stream's task on blocks this server batches), else None.

    ``task_args`` as Petals' handler submits them: (hidden_states, hypo_ids, inference_infos, *prompts),
    or a grouped task's (hidden_states, GroupedRows).
    """
    if _grouped(task_args):
        uids = tuple(info.uid for info in task_args[1].infos[0])
        return uids if batchable_uids.issuperset(uids) else None
    hidden_states, hypo_ids, infos, *prompts = task_args
    if tuple(hidden_states.shape[:2]) != (1, 1) or hypo_ids.numel() != 0:
        return None
    if any(prompt is not None for prompt in prompts) or any(info.active_adapter for info in infos):
        return None
    uids = tuple(info.uid for info in infos)
    if not uids or not batchable_uids.issuperset(uids):
        return None
    return uids


def _grouped(task_args: Sequence[Any]) -> bool:
    return len(task_args) == 2 and isinstance(task_args[1], GroupedRows)


def _session_infos(task_args: Sequence[Any]) -> tuple[tuple[Any, ...], ...]:
    """A task's sessions' block infos, one per session."""
    return task_args[1].infos if _grouped(task_args) else (tuple(task_args[2]),)


def _lengths(task_args: Sequence[Any]) -> tuple[int, ...]:
    """How many rows of the task's hidden states each of its sessions has."""
    return task_args[1].lengths if _grouped(task_args) else (1,)


def take_group(first: Any, queued: Sequence[Any], key: Callable[[Any], Hashable | None],
               limit: int) -> tuple[list[Any], list[Any]]:  # fmt: skip
    """(``first`` and the queued tasks that batch with it, at most ``limit`` in all; the others, in order)."""
    first_key = key(first)
    group, others = [first], []
    for task in queued:
        if first_key is not None and len(group) < limit and key(task) == first_key:
            group.append(task)
        else:
            others.append(task)
    return group, others


@dataclass(frozen=True)
class StepGroup:
    """The runtime's input for a batched step: the sessions' new rows side by side, each session's block
    infos and row count; ``errors`` (session index -> its exception) is filled where the pass had to run
    sessions alone."""

    hidden_states: torch.Tensor  # [rows, 1, hidden]
    infos: tuple[tuple[Any, ...], ...]  # per session, Petals' InferenceMetadata per block
    lengths: tuple[int, ...]  # per session, its rows
    errors: dict[int, BaseException] = field(default_factory=dict)

    def row_slices(self) -> list[slice]:
        """Each session's rows."""
        ends = list(itertools.accumulate(self.lengths))
        return [slice(end - length, end) for end, length in zip(ends, self.lengths, strict=True)]


class BatchedInferenceStep:
    """The pool's process function: a ``StepGroup`` as one pass, anything else through Petals' step."""

    def __init__(self, backends: dict[str, Any], merged_step: Callable[..., tuple[torch.Tensor, ...]]) -> None:
        self.backends = backends
        self.merged_step = merged_step
        blocks = {uid: batched_blocks.batchable_block(backend) for uid, backend in backends.items()}
        self.blocks = {uid: block for uid, block in blocks.items() if block is not None}
        self.batchable_uids = frozenset(self.blocks)

    def __call__(self, *args: Any) -> tuple[torch.Tensor, ...]:
        if len(args) == 1 and isinstance(args[0], StepGroup):
            group = args[0]
            try:
                outputs = self._batched(group)
            except Exception:  # e.g. one session's cache freed meanwhile: the others must not fail with it
                batching_metrics.count_steps("fallback", len(group.infos))
                return (self._one_by_one(group),)
            batching_metrics.count_steps("batched", len(group.infos))
            return (outputs,)
        batching_metrics.count_steps("alone")
        return self.merged_step(*args)

    def _one_by_one(self, group: StepGroup) -> torch.Tensor:
        """Each session through Petals' own step (it rewrites the one position a failed pass may have written)."""
        outputs = torch.zeros_like(group.hidden_states)
        no_hypo_ids = torch.empty(0, dtype=torch.int64)
        for index, (infos, rows) in enumerate(zip(group.infos, group.row_slices(), strict=True)):
            hidden_states = group.hidden_states[rows].transpose(0, 1).clone()  # [1, length, hidden]
            try:
                (step_outputs,) = self.merged_step(hidden_states, no_hypo_ids, infos, *([None] * len(infos)))
            except Exception as error:  # this session's own failure, sent to it alone
                group.errors[index] = error
                continue
            outputs[rows] = step_outputs.transpose(0, 1)
        return outputs

    def _batched(self, group: StepGroup) -> torch.Tensor:
        from petals.utils.peft import using_adapter

        uids = [info.uid for info in group.infos[0]]
        steps = batched_blocks.Steps(tuple(session[0].prefix_length for session in group.infos), group.lengths)
        memory_cache = self.backends[uids[0]].memory_cache
        handles = [handle for session in group.infos for info in session for handle in info.cache_handles]
        no_adapter = group.infos[0][0].active_adapter  # as Petals' step sets it: LoRA layers of loaded adapters off
        with memory_cache.use_cache(*handles) as tensors, using_adapter(no_adapter):
            by_handle = dict(zip(handles, tensors, strict=True))
            caches = [
                [_keys_values(session[block], by_handle) for session in group.infos] for block in range(len(uids))
            ]
            blocks = [self.blocks[uid] for uid in uids]
            return batched_blocks.inference_step(blocks, caches, group.hidden_states, steps)


def _keys_values(info: Any, by_handle: dict[Any, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = info.cache_handles  # one shard: one key and one value tensor per block
    return by_handle[keys], by_handle[values]


def _pool_class() -> type:
    from petals.server import task_pool

    class BatchingTaskPool(task_pool.PrioritizedTaskPool):
        """Petals' pool, whose runtime batches the decoding steps queued together (module docstring)."""

        process_func: BatchedInferenceStep

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._groups: dict[int, list[task_pool.Task]] = {}
            self._step_groups: dict[int, StepGroup] = {}
            self._largest_group = 1

        def _key(self, task: task_pool.Task) -> Hashable | None:
            return decode_key(task.args, self.process_func.batchable_uids)

        def load_batch_to_runtime(self, timeout: float | None = None, device: torch.device | None = None):
            first = self._ordered_tasks.get(block=True, timeout=timeout)
            self.batch_receiver.recv()
            group = self._group_with(first)
            self._note(group)
            self._groups[first.uid] = group
            self._dispatched_tasks[first.uid] = first
            if not self._ordered_tasks.empty():
                head = self._ordered_tasks.queue[0]
                self.priority = (head.priority, head.time_submitted)
            device = device if device is not None else self.device
            if len(group) == 1 and not _grouped(first.args):
                return first.uid, [task_pool._move_to_device_if_tensor(arg, device) for arg in first.args]
            hidden_states = torch.cat([task.args[0] for task in group]).to(device)
            infos = tuple(session for task in group for session in _session_infos(task.args))
            lengths = tuple(length for task in group for length in _lengths(task.args))
            self._step_groups[first.uid] = StepGroup(hidden_states, infos, lengths)
            return first.uid, [self._step_groups[first.uid]]

        def _group_with(self, first: task_pool.Task) -> list[task_pool.Task]:
            """``first`` and the queued steps that batch with it, taken off the queue and the runtime's pipe."""
            queued = []
            if self._key(first) is not None:
                while not self._ordered_tasks.empty():
                    queued.append(self._ordered_tasks.get_nowait())
            group, others = take_group(first, queued, self._key, self.max_batch_size)
            for task in others:
                self._ordered_tasks.put(task)
            for _ in group[1:]:
                self.batch_receiver.recv()  # one per task, as Petals counts them
            return group

        def _note(self, group: list[task_pool.Task]) -> None:
            """Count the pass's sessions (each of a grouped task's); a session's queue wait is its task's."""
            submitted = [task.time_submitted for task in group for _ in _session_infos(task.args)]
            batching_metrics.observe_pass(submitted)
            if len(submitted) > self._largest_group:  # a few lines per server's life: the sizes it has reached
                self._largest_group = len(submitted)
                print(f"{PATCH}: the first batched step of {len(submitted)} sessions", file=sys.stderr, flush=True)

        def send_outputs_from_runtime(self, uid: int, batch_outputs: list[torch.Tensor]) -> None:
            group = self._groups.pop(uid, None)
            if group is None or (len(group) == 1 and not _grouped(group[0].args)):
                return super().send_outputs_from_runtime(uid, batch_outputs)
            self._dispatched_tasks.pop(uid, None)
            errors = self._step_groups.pop(uid).errors
            start = session = 0
            for task in group:
                rows, sessions = len(task.args[0]), len(_session_infos(task.args))
                outputs = _shared(batch_outputs[0][start : start + rows])
                if _grouped(task.args):
                    failed = torch.tensor([session + index in errors for index in range(sessions)])
                    task.future.set_result([outputs, _shared(failed)])
                elif session in errors:
                    task.future.set_exception(errors[session])
                else:
                    task.future.set_result([outputs])
                start, session = start + rows, session + sessions

        def send_exception_from_runtime(self, uid: int, exception: BaseException) -> None:
            group = self._groups.pop(uid, None)
            self._step_groups.pop(uid, None)
            super().send_exception_from_runtime(uid, exception)
            for task in (group or [])[1:]:
                task.future.set_exception(exception)

    return BatchingTaskPool


def _shared(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` in shared memory, as the runtime sends results to a handler's process."""
    from petals.server import task_pool

    return task_pool._move_to_device_if_tensor(tensor.clone(), "cpu", share_memory=True)


def merge_inference_pools_batching(backends: dict[str, Any]) -> None:
    """Petals' ``merge_inference_pools_inplace`` with a ``BatchingTaskPool`` as the merged pool."""
    from petals.server.backend import _MergedInferenceStep

    first_pool = next(iter(backends.values())).inference_pool
    step = BatchedInferenceStep(backends, _MergedInferenceStep(backends))
    pool = _pool_class()(step, max_batch_size=first_pool.max_batch_size, device=first_pool.device,
                         name="merged_inference")  # fmt: skip
    for backend in backends.values():
        assert not backend.inference_pool.is_alive()
        backend.inference_pool = pool


def runtime_args(args: list[str]) -> list[str]:
    """``args`` with ``--prefetch_batches 0`` unless given: the runtime takes tasks only when it is free."""
    if any(arg == "--prefetch_batches" or arg.startswith("--prefetch_batches=") for arg in args):
        return list(args)
    return [*args, "--prefetch_batches", "0"]


def check() -> None:
    """Raise PatchError unless Petals' pools, runtime, Llama and BLOOM blocks are the ones this patch fits."""
    for dist, version in PATCHED_VERSIONS.items():
        require_version(dist, version, PATCH)
    import hivemind.moe.server.runtime as runtime
    import petals.models.bloom.block as bloom
    import petals.models.llama.block as llama
    import petals.server.backend as backend
    import petals.server.server as server
    import petals.server.task_pool as task_pool
    import petals.utils.peft as peft
    import transformers.models.bloom.modeling_bloom as modeling_bloom

    require_attributes(server, ("merge_inference_pools_inplace",), PATCH)
    require_attributes(backend, ("_MergedInferenceStep",), PATCH)
    require_attributes(task_pool, ("_move_to_device_if_tensor", "Task"), PATCH)
    require_attributes(llama, (batched_blocks.LLAMA_BLOCK, "apply_rotary_pos_emb"), PATCH)
    require_attributes(bloom, (batched_blocks.BLOOM_BLOCK,), PATCH)
    require_attributes(modeling_bloom, ("build_alibi_tensor",), PATCH)
    require_attributes(peft, ("using_adapter",), PATCH)
    require_methods(modeling_bloom.BloomAttention, {"_split_heads": ("self", "fused_qkv")}, PATCH)
    require_methods(task_pool.PrioritizedTaskPool, {
        "load_batch_to_runtime": ("self", "timeout", "device"),
        "send_outputs_from_runtime": ("self", "uid", "batch_outputs"),
        "send_exception_from_runtime": ("self", "uid", "exception"),
    }, PATCH)  # fmt: skip
    require_methods(runtime.Runtime, {"process_batch": ("self", "pool", "batch_index")}, PATCH)
    require_methods(backend.MemoryCache, {"use_cache": ("self",)}, PATCH)


def install() -> None:
    """Check, then make every Petals server of this process (and its forks) batch its decoding steps."""
    check()
    import petals.server.server as server

    server.merge_inference_pools_inplace = merge_inference_pools_batching
