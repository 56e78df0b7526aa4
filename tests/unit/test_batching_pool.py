"""services/swarm/batching_pool.py and batched_blocks.py: which queued steps batch together, which
fall back to Petals' own step, that a batched pass equals each session's step alone, and the fence."""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections import Counter

import pytest
import torch
from petals.data_structures import InferenceMetadata
from prometheus_client import REGISTRY

from services.swarm import batched_blocks, batching_metrics, batching_pool
from tests.unit.fences import assert_refused, pretend_version, refusal

SPAN = ("model.0", "model.1")
UIDS = frozenset(SPAN)
DUMMY = torch.empty(0, dtype=torch.int64)


def step_args(tokens: int = 1, batch: int = 1, *, span=SPAN, hypo_ids=DUMMY, prompt=None, adapter="", prefix=5):
    infos = tuple(InferenceMetadata(uid, prefix, (2 * i, 2 * i + 1), adapter) for i, uid in enumerate(span))
    return (torch.randn(batch, tokens, 8), hypo_ids, infos, *([prompt] * len(span)))


def grouped_args(sessions: int, span=SPAN, lengths: tuple[int, ...] | None = None) -> tuple:
    """A grouped stream's task: ``sessions`` steps of ``lengths`` tokens, one each by default
    (services/swarm/grouped_inference.py)."""
    lengths = lengths or (1,) * sessions
    rows = batching_pool.GroupedRows(tuple(step_args(span=span)[2] for _ in range(sessions)), lengths)
    return (torch.randn(sum(lengths), 1, 8), rows)


@pytest.mark.parametrize(
    ("args", "batches"),
    [
        (step_args(), True),
        (step_args(prefix=0), True),
        (step_args(tokens=7), False),  # a prefill
        (step_args(batch=2), False),
        (step_args(hypo_ids=torch.tensor([0])), False),  # beam reordering
        (step_args(prompt=torch.zeros(1, 1, 8)), False),  # deep prompt tuning
        (step_args(adapter="lora"), False),
        (step_args(span=("model.0", "other.1")), False),  # a block this server cannot batch
        (grouped_args(3), True),  # a grouped stream's one-token steps
        (grouped_args(2, span=("model.0", "other.1")), False),
    ],
    ids=[
        "decode",
        "first-token",
        "prefill",
        "batch-2",
        "hypo-ids",
        "prompts",
        "adapter",
        "unbatchable-block",
        "grouped",
        "grouped-unbatchable-block",
    ],
)
def test_decode_key_says_which_steps_batch(args, batches):
    assert (batching_pool.decode_key(args, UIDS) is not None) is batches


def test_take_group_takes_the_compatible_queued_steps_and_keeps_the_others_in_order():
    key = lambda task: batching_pool.decode_key(task, UIDS)  # noqa: E731
    first, same, prefill, other_span, same_later = (
        step_args(), step_args(prefix=9), step_args(tokens=3), step_args(span=("model.1",)), step_args(prefix=1)
    )  # fmt: skip
    group, others = batching_pool.take_group(first, [same, prefill, other_span, same_later], key, limit=8)
    assert group == [first, same, same_later]
    assert others == [prefill, other_span]
    group, others = batching_pool.take_group(first, [same, same_later], key, limit=2)
    assert group == [first, same] and others == [same_later]


def test_a_step_that_cannot_batch_takes_nothing_with_it():
    key = lambda task: batching_pool.decode_key(task, UIDS)  # noqa: E731
    prefill, decode = step_args(tokens=4), step_args()
    assert batching_pool.take_group(prefill, [decode], key, limit=8) == ([prefill], [decode])


class FakeStep:
    """A process function that doubles its input and records what it was given."""

    batchable_uids = UIDS

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, *args):
        self.calls.append(args)
        hidden = args[0].hidden_states if isinstance(args[0], batching_pool.StepGroup) else args[0]
        return (hidden * 2,)


def _submit_and_wait(pool, tasks, connection) -> None:
    """In a forked child (as Petals' connection handlers are): submit ``tasks``, send back each outcome."""
    futures = [pool.submit_task(*args) for args in tasks]
    for future in futures:
        try:
            result = future.result(timeout=30)
            connection.send(result[0] if len(result) == 1 else result)  # a grouped task's: rows and failures
        except Exception as error:  # the outcome is what the test checks
            connection.send(repr(error))


@pytest.fixture
def pool_and_handler():
    """A started BatchingTaskPool with FakeStep, and ``submit(tasks) -> receive()`` from a forked handler."""
    step = FakeStep()
    pool = batching_pool._pool_class()(step, max_batch_size=64, name="test_pool", start=True)
    children = []

    def submit(tasks):
        parent, child = multiprocessing.get_context("fork").Pipe()
        process = multiprocessing.get_context("fork").Process(target=_submit_and_wait, args=(pool, tasks, child))
        process.start()
        children.append(process)
        deadline = time.monotonic() + 30
        while pool._ordered_tasks.qsize() < len(tasks) and time.monotonic() < deadline:
            time.sleep(0.01)
        return lambda: [parent.recv() for _ in tasks]

    yield pool, step, submit
    pool.shutdown()
    for process in children:
        process.join(timeout=10)


def test_the_pool_runs_the_steps_queued_together_as_one_and_answers_each_future(pool_and_handler):
    pool, step, submit = pool_and_handler
    passes_before, steps_before = pass_count(), wait_count()
    tasks = [step_args(), step_args(tokens=3), step_args(), step_args()]
    receive = submit(tasks)
    loaded = [pool.load_batch_to_runtime(), pool.load_batch_to_runtime()]
    assert pool.empty  # every task's token was taken off the runtime's pipe
    for uid, inputs in loaded:
        pool.send_outputs_from_runtime(uid, step(*inputs))
    (group,), prefill = step.calls[0], step.calls[1]
    assert isinstance(group, batching_pool.StepGroup) and group.hidden_states.shape == (3, 1, 8)
    assert prefill[0].shape == (1, 3, 8)  # alone, with Petals' own arguments
    for args, output in zip(tasks, receive(), strict=True):
        torch.testing.assert_close(output, args[0] * 2)
    assert pass_count() - passes_before == 2 and wait_count() - steps_before == 4  # a pass of 3, one of 1


def test_each_step_that_cannot_batch_reaches_petals_step_alone_with_its_own_arguments(pool_and_handler):
    """Prefills, beam reordering, deep prompts and adapters: each its own pass, its arguments as Petals' handler
    submitted them, while the decoding steps queued among them batch together."""
    pool, step, submit = pool_and_handler
    prompt = torch.zeros(1, 1, 8)
    alone = [step_args(tokens=3), step_args(hypo_ids=torch.tensor([0])), step_args(prompt=prompt),
             step_args(adapter="lora")]  # fmt: skip
    tasks = [step_args(), *alone, step_args()]
    receive = submit(tasks)
    for _ in range(1 + len(alone)):
        uid, inputs = pool.load_batch_to_runtime()
        pool.send_outputs_from_runtime(uid, step(*inputs))
    (group,), *singles = step.calls
    assert isinstance(group, batching_pool.StepGroup) and group.hidden_states.shape == (2, 1, 8)
    for args, submitted in zip(singles, alone, strict=True):
        torch.testing.assert_close(args[0], submitted[0])
        torch.testing.assert_close(args[1], submitted[1])
        assert [info.active_adapter for info in args[2]] == [info.active_adapter for info in submitted[2]]
        assert [p is None for p in args[3:]] == [p is None for p in submitted[3:]]
    for args, output in zip(tasks, receive(), strict=True):
        torch.testing.assert_close(output, args[0] * 2)


def pass_count() -> float:
    return REGISTRY.get_sample_value("petals_chat_swarm_pass_sessions_count") or 0.0


def wait_count() -> float:
    return REGISTRY.get_sample_value("petals_chat_swarm_queue_wait_seconds_count") or 0.0


def test_an_error_in_a_batched_pass_reaches_every_session_of_the_group(pool_and_handler):
    pool, _, submit = pool_and_handler
    receive = submit([step_args(), step_args()])
    uid, _ = pool.load_batch_to_runtime()
    pool.send_exception_from_runtime(uid, ValueError("boom"))
    assert receive() == ["ValueError('boom')"] * 2


class FailingSecondStep(FakeStep):
    """A process function whose batched pass had to run its sessions alone, the second failing."""

    def __call__(self, *args):
        outputs = super().__call__(*args)
        if isinstance(args[0], batching_pool.StepGroup):
            args[0].errors[1] = KeyError("cache freed")
        return outputs


def test_a_session_that_fails_alone_fails_alone(pool_and_handler):
    pool, _, submit = pool_and_handler
    pool.process_func = step = FailingSecondStep()
    tasks = [step_args(), step_args(), step_args()]
    receive = submit(tasks)
    uid, inputs = pool.load_batch_to_runtime()
    pool.send_outputs_from_runtime(uid, step(*inputs))
    first, second, third = receive()
    torch.testing.assert_close(first, tasks[0][0] * 2)
    assert second == "KeyError('cache freed')"
    torch.testing.assert_close(third, tasks[2][0] * 2)


def test_a_grouped_task_runs_in_one_pass_with_the_steps_queued_beside_it(pool_and_handler):
    pool, step, submit = pool_and_handler
    sessions_before = REGISTRY.get_sample_value("petals_chat_swarm_pass_sessions_sum") or 0.0
    tasks = [grouped_args(3), step_args(), step_args(tokens=2)]
    receive = submit(tasks)
    for _ in range(2):
        uid, inputs = pool.load_batch_to_runtime()
        pool.send_outputs_from_runtime(uid, step(*inputs))
    (group,), prefill = step.calls
    assert isinstance(group, batching_pool.StepGroup) and group.hidden_states.shape == (4, 1, 8)
    assert group.infos == (*tasks[0][1].infos, tasks[1][2])
    assert prefill[0].shape == (1, 2, 8)
    (rows, failed), single, prefilled = receive()
    torch.testing.assert_close(rows, tasks[0][0] * 2)
    assert failed.tolist() == [False, False, False]
    torch.testing.assert_close(single, tasks[1][0] * 2)
    torch.testing.assert_close(prefilled, tasks[2][0] * 2)
    assert REGISTRY.get_sample_value("petals_chat_swarm_pass_sessions_sum") - sessions_before == 5  # 4, then 1


def test_a_grouped_task_alone_is_a_pass_and_says_which_of_its_sessions_failed(pool_and_handler):
    pool, _, submit = pool_and_handler
    pool.process_func = step = FailingSecondStep()
    tasks = [grouped_args(3)]
    receive = submit(tasks)
    uid, inputs = pool.load_batch_to_runtime()
    assert isinstance(inputs[0], batching_pool.StepGroup)
    pool.send_outputs_from_runtime(uid, step(*inputs))
    ((rows, failed),) = receive()
    assert failed.tolist() == [False, True, False]
    torch.testing.assert_close(rows[0], tasks[0][0][0] * 2)


def test_a_grouped_task_with_prompts_gives_each_session_its_rows_and_its_own_failure(pool_and_handler):
    pool, _, submit = pool_and_handler
    pool.process_func = step = FailingSecondStep()
    tasks = [grouped_args(3, lengths=(2, 1, 3)), step_args()]
    receive = submit(tasks)
    uid, inputs = pool.load_batch_to_runtime()
    assert inputs[0].lengths == (2, 1, 3, 1) and inputs[0].hidden_states.shape == (7, 1, 8)
    pool.send_outputs_from_runtime(uid, step(*inputs))
    (rows, failed), single = receive()
    assert failed.tolist() == [False, True, False]
    torch.testing.assert_close(rows, tasks[0][0] * 2)
    torch.testing.assert_close(single, tasks[1][0] * 2)


class Shards:
    def __init__(self, *shards):
        self.module_shards = shards


class Backend:
    def __init__(self, module, memory_cache=None):
        self.module = module
        self.memory_cache = memory_cache


class MemoryCache:
    """Petals' MemoryCache.use_cache, for handles the test never reads."""

    @contextlib.contextmanager
    def use_cache(self, *handles):
        yield [None] * len(handles)


def test_a_failed_batched_pass_runs_each_session_through_petals_step(monkeypatch):
    def inference_step(*args):
        raise KeyError("a handle freed meanwhile")

    def merged_step(hidden_states, hypo_ids, infos, *prompts):
        assert hypo_ids.numel() == 0 and prompts == (None,) * len(infos)
        if infos[0].prefix_length == 2:
            raise KeyError("this session's cache")
        return (hidden_states + 1,)

    monkeypatch.setattr(batched_blocks, "inference_step", inference_step)
    step = batching_pool.BatchedInferenceStep({uid: Backend(Shards(tiny_llama_block())) for uid in SPAN}, merged_step)
    infos = tuple(step_args(prefix=prefix)[2] for prefix in (1, 2, 3))
    group = batching_pool.StepGroup(torch.randn(5, 1, 8), infos, (1, 1, 3))  # the third session: a prompt
    before = steps_by_path()
    (outputs,) = step(group)
    torch.testing.assert_close(outputs[[0, 2, 3, 4]], group.hidden_states[[0, 2, 3, 4]] + 1)
    assert list(group.errors) == [1]
    assert steps_by_path() - before == Counter({"fallback": 3})


def steps_by_path() -> Counter:
    """petals_chat_swarm_steps_total by path, as exported."""
    return Counter({path: REGISTRY.get_sample_value("petals_chat_swarm_steps_total", {"path": path})
                    for path in batching_metrics.STEP_PATHS})  # fmt: skip


def test_the_step_counts_each_session_of_a_batched_pass_and_each_step_alone(monkeypatch):
    monkeypatch.setattr(batched_blocks, "inference_step", lambda blocks, caches, hidden, steps: hidden * 2)
    monkeypatch.setattr(batching_pool, "_keys_values", lambda info, by_handle: (None, None))
    memory_cache = MemoryCache()
    backends = {uid: Backend(Shards(tiny_llama_block()), memory_cache) for uid in SPAN}
    step = batching_pool.BatchedInferenceStep(backends, lambda hidden, *rest: (hidden + 1,))
    group = batching_pool.StepGroup(torch.randn(4, 1, 8), tuple(step_args(prefix=p)[2] for p in (1, 2, 3, 4)),
                                      (1, 1, 1, 1))  # fmt: skip
    before = steps_by_path()
    (batched,) = step(group)
    (alone,) = step(*step_args(tokens=3))
    torch.testing.assert_close(batched, group.hidden_states * 2)
    assert alone.shape == (1, 3, 8)
    assert steps_by_path() - before == Counter({"batched": 4, "alone": 1})


def tiny_llama_block(seed: int = 0):
    from petals.models.llama.block import WrappedLlamaBlock
    from transformers import LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         rope_theta=100000.0)  # fmt: skip
    block = WrappedLlamaBlock(config).eval()
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return block


def petals_cache(block, prefix: int, kv_heads: int, head_dim: int, max_length: int = 16):
    """A session's cache in Petals' layout after ``prefix`` tokens through ``block`` (its own forward)."""
    keys, values = torch.zeros(1, kv_heads, head_dim, max_length), torch.zeros(1, kv_heads, max_length, head_dim)
    if prefix:
        _, (new_keys, new_values) = block(torch.randn(1, prefix, 32), use_cache=True)
        keys[..., :prefix] = new_keys.view(1, *new_keys.shape)
        values[:, :, :prefix] = new_values.view(1, *new_values.shape)
    return keys, values


def assert_a_batched_step_equals_each_session_alone(blocks, caches, prefixes: list[int], lengths: list[int]) -> None:
    """``inference_step`` over sessions with ``caches`` (per block, per session), each bringing ``lengths``
    new tokens, equals each session run alone through Petals' own blocks: outputs, and the keys and values
    written into each cache."""
    before = [[(keys.clone(), values.clone()) for keys, values in block_caches] for block_caches in caches]
    hidden = torch.randn(sum(lengths), 1, 32)
    steps = batched_blocks.Steps(tuple(prefixes), tuple(lengths))

    batched = batched_blocks.inference_step(blocks, caches, hidden, steps)

    for session, (start, prefix, length) in enumerate(steps):
        rows = slice(start, start + length)
        alone = hidden[rows].transpose(0, 1)  # [1, length, hidden]
        for index, block in enumerate(blocks):
            keys, values = before[index][session]
            past = (keys.flatten(0, 1)[:, :, :prefix], values.flatten(0, 1)[:, :prefix]) if prefix else None
            alone, (new_keys, new_values) = block(alone, layer_past=past, use_cache=True)
            total = prefix + length
            torch.testing.assert_close(caches[index][session][0][..., :total], new_keys.view(1, *new_keys.shape))
            torch.testing.assert_close(caches[index][session][1][:, :, :total], new_values.view(1, *new_values.shape))
        torch.testing.assert_close(batched[rows].transpose(0, 1), alone)


@pytest.mark.parametrize("lengths", [[1, 1, 1], [4, 1, 3]], ids=["decoding", "with-prompts"])
@torch.inference_mode()
def test_a_batched_llama_step_equals_each_session_alone_in_petals_block(lengths):
    blocks = [tiny_llama_block(0), tiny_llama_block(1)]
    prefixes = [0, 3, 7]
    attention = blocks[0].self_attn
    shape = {"kv_heads": attention.num_key_value_heads, "head_dim": attention.head_dim}
    caches = [[petals_cache(block, prefix, **shape) for prefix in prefixes] for block in blocks]
    assert_a_batched_step_equals_each_session_alone(blocks, caches, prefixes, lengths)


def tiny_bloom_block(seed: int = 0):
    from petals.models.bloom.block import WrappedBloomBlock
    from transformers import BloomConfig

    torch.manual_seed(seed)
    block = WrappedBloomBlock(BloomConfig(hidden_size=32, n_head=4)).eval()
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return block


@pytest.mark.parametrize("lengths", [[1, 1, 1], [5, 1, 2]], ids=["decoding", "with-prompts"])
@torch.inference_mode()
def test_a_batched_bloom_step_equals_each_session_alone_in_petals_block(lengths):
    blocks = [tiny_bloom_block(0), tiny_bloom_block(1)]
    prefixes = [0, 4, 9]
    shape = {"kv_heads": blocks[0].num_heads, "head_dim": 32 // blocks[0].num_heads}
    caches = [[petals_cache(block, prefix, **shape) for prefix in prefixes] for block in blocks]
    assert_a_batched_step_equals_each_session_alone(blocks, caches, prefixes, lengths)


def test_llama_block_is_batchable_and_others_are_not():
    block = tiny_llama_block()
    assert batched_blocks.batchable_block(Backend(Shards(block))) is block
    assert batched_blocks.batchable_block(Backend(Shards(block, block))) is None  # tensor-parallel shards
    assert batched_blocks.batchable_block(Backend(Shards(torch.nn.Linear(2, 2)))) is None  # another family
    bloom = tiny_bloom_block()
    assert batched_blocks.batchable_block(Backend(Shards(bloom))) is bloom
    block.self_attn.config.rope_scaling = {"type": "dynamic", "factor": 2.0}
    assert batched_blocks.batchable_block(Backend(Shards(block))) is None


def test_runtime_args_take_tasks_only_when_free_unless_told():
    assert batching_pool.runtime_args(["m", "--port", "1"]) == ["m", "--port", "1", "--prefetch_batches", "0"]
    assert batching_pool.runtime_args(["m", "--prefetch_batches", "2"]) == ["m", "--prefetch_batches", "2"]


def test_the_batching_fence_fits_the_installed_libraries():
    batching_pool.check()


@pytest.mark.parametrize("dist", sorted(batching_pool.PATCHED_VERSIONS))
def test_the_batching_fence_refuses_another_version_in_one_line(monkeypatch, dist):
    pretend_version(monkeypatch, dist)
    assert_refused(batching_pool.check, refusal(batching_pool.PATCH, dist, batching_pool.PATCHED_VERSIONS[dist]))


def test_patches_install_the_batching_pool_only_when_on(monkeypatch):
    import petals.server.server as server

    from services.swarm import bitsandbytes_triton, grouped_inference, patches, small_tensors

    monkeypatch.setattr(bitsandbytes_triton, "install", lambda: None)  # the others' own tests cover them
    monkeypatch.setattr(small_tensors, "install", lambda limit: None)
    grouped = []
    monkeypatch.setattr(grouped_inference, "install", lambda: grouped.append(True))
    monkeypatch.setattr(server, "merge_inference_pools_inplace", server.merge_inference_pools_inplace)
    petals_merge = server.merge_inference_pools_inplace
    patches.install(4096)
    assert server.merge_inference_pools_inplace is petals_merge and not grouped
    patches.install(4096, batching=True)
    assert server.merge_inference_pools_inplace is batching_pool.merge_inference_pools_batching and grouped


def test_serve_refuses_a_bad_swarm_batching_in_one_line(monkeypatch, capsys):
    from services.swarm import serve

    monkeypatch.setenv(batching_pool.ENV, "maybe")
    monkeypatch.setattr(serve, "wait_for_a_peer", lambda *args: pytest.fail("waited for a peer"))
    assert serve.main(["/models/tiny-bloom"]) == 2
    assert capsys.readouterr().err == "serve: SWARM_BATCHING must be a boolean (1/0, true/false), got 'maybe'\n"


def test_the_pool_metrics_are_served_over_http():
    import urllib.request

    from deploy.local_stack import pick_free_port
    from services.swarm import batching_metrics

    batching_metrics.observe_pass([0.0, 0.5], now=1.0)
    port = pick_free_port("127.0.0.1")
    batching_metrics.serve(port, host="127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'petals_chat_swarm_pass_sessions_bucket{le="2.0"}' in text
    assert 'petals_chat_swarm_queue_wait_seconds_bucket{le="1.0"}' in text
    for path in batching_metrics.STEP_PATHS:
        assert f'petals_chat_swarm_steps_total{{path="{path}"}}' in text


def test_serve_refuses_a_metrics_port_out_of_range_in_one_line(monkeypatch, capsys):
    from services.swarm import serve

    monkeypatch.setenv("SWARM_METRICS_PORT", "70000")
    monkeypatch.setattr(serve, "wait_for_a_peer", lambda *args: pytest.fail("waited for a peer"))
    assert serve.main(["/models/tiny-bloom"]) == 2
    assert capsys.readouterr().err.startswith("serve: SWARM_METRICS_PORT must be")
