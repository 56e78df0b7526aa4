"""Continuous batching (SWARM_BATCHING) on a private swarm equals in-process ``transformers``.

One swarm of batching servers: two split SmolLM2's 30 blocks, a third serves the tiny BLOOM
(alibi). The stock Petals client (``smol_client`` of tests/integration/conftest.py, resolved against
this module's ``smol_swarm``) runs many sessions at once from threads, of different lengths, joining and
leaving while others decode: each session's greedy tokens equal the oracle's, and the servers' logs
show batched steps (from sessions that step in lockstep, so that their steps reach each server together
whatever the machine's load); the same for tiny BLOOM's sessions. A beam search (``hypo_ids`` reordering, two
sequences per step) and every session's prefill take Petals' own step on the same servers,
interleaved with batched ones. Then an inference replica on the same swarm: sessions at once through
it equal the oracle, and its LM head computed some of their tokens together (REPLICA_HEAD_BATCHING:
batched server steps answer their sessions at the same moment).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from client.api import Api
from deploy.local_stack import ServiceProcess
from services.swarm.batching_pool import ENV, PATCH
from services.swarm.launcher import PrivateSwarm, SwarmModel
from tests.helpers import SMOL_DHT_PREFIX, SMOL_NEW_TOKENS, SMOL_QUESTIONS, chatml, each_in_a_thread, start_inference

pytestmark = pytest.mark.integration
MORE_QUESTIONS = [*SMOL_QUESTIONS, "What is 2 + 2?", "Name three colors."]
SESSION_TOKENS = [24, 6, 16, 10, 20, 8]  # session i asks MORE_QUESTIONS[i % 4] for this many tokens at most
JOIN_AFTER = 3  # session i opens once the sessions before it have made 3 * i tokens in all
LOCKSTEP_TOKENS = 6  # each session of a lockstep run
BATCHED = f"{PATCH}: the first batched step of"
BLOOM_PREFIX = "petals-chat-batching-bloom"
BLOOM_PROMPTS = ["Hello there", "The sea is", "Once upon a time", "A B C"]
BLOOM_TOKENS = [16, 5, 12, 8]


@pytest.fixture(scope="module")
def smol_swarm(smol_dir: Path, model_dir: Path, artifacts_dir: Path) -> Iterator[PrivateSwarm]:
    """This module's swarm (``smol_client`` resolves it): SmolLM2 on two servers, tiny BLOOM on a third,
    all batching."""
    bloom = SwarmModel(model_dir, ("0:4",), BLOOM_PREFIX)
    with PrivateSwarm(smol_dir, ["0:15", "15:30"], artifacts_dir / "batching-swarm", dht_prefix=SMOL_DHT_PREFIX,
                      more_models=[bloom], env={ENV: "true"}) as swarm:  # fmt: skip
        yield swarm


@pytest.fixture(scope="module")
def bloom_client(model_dir: Path, smol_swarm: PrivateSwarm):
    """The stock Petals client of tiny BLOOM on this module's swarm."""
    from petals import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers=smol_swarm.initial_peers, dht_prefix=BLOOM_PREFIX
    ).eval()
    yield model
    sequence_manager = model.transformer.h.sequence_manager
    sequence_manager.shutdown()
    sequence_manager.dht.shutdown()


@pytest.fixture(scope="module")
def oracle_cases(smol_tokenizer, smol_oracle) -> dict[str, tuple[list[int], list[int]]]:
    """question -> (prompt ids, the oracle's SMOL_NEW_TOKENS greedy ids)."""
    prompts = {question: chatml(smol_tokenizer, question) for question in MORE_QUESTIONS}
    return {question: (ids, smol_oracle(ids)) for question, ids in prompts.items()}


def one_token_per_call(client, ids: list[int], count: int, on_token: Callable[[], object] = lambda: None) -> list[int]:
    """Greedy tokens of ``ids``, one per ``generate`` call in one inference session, ``count`` at most;
    ``on_token`` is called after each."""
    import torch

    generated: list[int] = []
    with torch.inference_mode(), client.inference_session(max_length=len(ids) + SMOL_NEW_TOKENS) as session:
        out = client.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False, session=session)
        generated.append(out[0, -1].item())
        on_token()
        while len(generated) < count:
            out = client.generate(None, max_new_tokens=1, do_sample=False, session=session)
            generated.append(out[0, -1].item())
            on_token()
    return generated


def run_sessions(client, sessions: list[tuple[list[int], int]], before: Callable[[int], None],
                 on_token: Callable[[], object]) -> list[list[int] | BaseException]:  # fmt: skip
    """Each (prompt ids, tokens) one token per call in its own thread, after ``before(its index)``."""

    def session(index: int) -> list[int]:
        before(index)
        return one_token_per_call(client, *sessions[index], on_token)

    return each_in_a_thread(len(sessions), session, timeout_s=600)


def run_staggered(client, sessions: list[tuple[list[int], int]]) -> list[list[int] | BaseException]:
    """Session i opens once all sessions have made ``JOIN_AFTER * i`` tokens in all, so sessions join
    and leave while others decode."""
    made = threading.Condition()
    tokens_made = [0]

    def wait_turn(index: int) -> None:
        with made:
            made.wait_for(lambda: tokens_made[0] >= JOIN_AFTER * index, timeout=300)

    def count_token() -> None:
        with made:
            tokens_made[0] += 1
            made.notify_all()

    return run_sessions(client, sessions, wait_turn, count_token)


def run_lockstep(client, prompts: list[list[int]]) -> list[list[int] | BaseException]:
    """LOCKSTEP_TOKENS tokens of each prompt, every session's next step sent once all have made their
    last token: the steps reach each server together, so every server gets steps to batch."""
    step = threading.Barrier(len(prompts), timeout=300)
    return run_sessions(client, [(ids, LOCKSTEP_TOKENS) for ids in prompts], lambda _: None, step.wait)


def assert_batched(server) -> None:
    assert BATCHED in server.log_path.read_text(errors="replace"), f"{server.name} never batched a step"


def test_concurrent_sessions_joining_and_leaving_equal_the_oracle(smol_client, oracle_cases, smol_swarm):
    cases = [oracle_cases[MORE_QUESTIONS[index % len(MORE_QUESTIONS)]] for index in range(len(SESSION_TOKENS))]
    counts = [min(tokens, len(expected)) for tokens, (_, expected) in zip(SESSION_TOKENS, cases, strict=True)]
    results = run_staggered(smol_client, [(ids, count) for (ids, _), count in zip(cases, counts, strict=True)])
    for index, ((_, expected), count) in enumerate(zip(cases, counts, strict=True)):
        assert results[index] == expected[:count], f"session {index}"
    lockstep = run_lockstep(smol_client, [ids for ids, _ in cases[:4]])
    for index, (_, expected) in enumerate(cases[:4]):
        assert lockstep[index] == expected[:LOCKSTEP_TOKENS], f"lockstep session {index}"
    for server in smol_swarm.servers[:2]:
        assert_batched(server)


def test_concurrent_tiny_bloom_sessions_equal_the_oracle(bloom_client, oracle, tokenizer, smol_swarm):
    prompts = [tokenizer(prompt, add_special_tokens=False).input_ids for prompt in BLOOM_PROMPTS]
    results = run_staggered(bloom_client, list(zip(prompts, BLOOM_TOKENS, strict=True)))
    for index, (ids, count) in enumerate(zip(prompts, BLOOM_TOKENS, strict=True)):
        assert results[index] == oracle(ids, count), f"session {index}"
    lockstep = run_lockstep(bloom_client, prompts)
    for index, ids in enumerate(prompts):
        assert lockstep[index] == oracle(ids, LOCKSTEP_TOKENS), f"lockstep session {index}"
    assert_batched(smol_swarm.servers[2])


def test_beam_search_falls_back_beside_a_batched_session_and_equals_transformers(smol_client, oracle_cases, smol_dir):
    """Two sequences a step and ``hypo_ids`` reordering: Petals' own step, beside a session that batches."""
    import torch
    from transformers import LlamaForCausalLM

    ids, expected = oracle_cases[SMOL_QUESTIONS[1]]
    beams: dict[str, list[int]] = {}
    greedy = threading.Thread(target=lambda: beams.setdefault("greedy", one_token_per_call(smol_client, ids, 12)))
    greedy.start()
    with torch.inference_mode():
        out = smol_client.generate(torch.tensor([ids]), max_new_tokens=8, num_beams=2, do_sample=False)
    greedy.join(timeout=600)
    model = LlamaForCausalLM.from_pretrained(smol_dir, torch_dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = model.generate(torch.tensor([ids]), max_new_tokens=8, num_beams=2, do_sample=False)
    assert out[0, len(ids) :].tolist() == reference[0, len(ids) :].tolist()
    assert beams["greedy"] == expected[:12]


@pytest.fixture(scope="module")
def smol_replica(smol_swarm: PrivateSwarm, smol_dir: Path, artifacts_dir: Path) -> Iterator[ServiceProcess]:
    """An inference replica of SmolLM2 on this module's swarm (REPLICA_HEAD_BATCHING on, its default)."""
    service = start_inference(
        smol_swarm, smol_dir, artifacts_dir, "inference-head-batching", DHT_PREFIX=SMOL_DHT_PREFIX
    )
    yield service
    service.stop()


def test_replica_sessions_at_once_equal_the_oracle_with_batched_head_products(
    smol_replica, oracle_cases, smol_tokenizer
):
    questions = [*MORE_QUESTIONS, *MORE_QUESTIONS[:2]]
    api = Api(smol_replica.base_url)
    prompts = [smol_tokenizer.decode(oracle_cases[question][0]) for question in questions]
    with ThreadPoolExecutor(len(questions)) as pool:
        bodies = list(pool.map(lambda prompt: api.generate(inputs=prompt, max_new_tokens=SMOL_NEW_TOKENS), prompts))
    for question, body in zip(questions, bodies, strict=True):
        expected = oracle_cases[question][1]
        answer = smol_tokenizer.decode(expected, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert body == {"ok": True, "outputs": answer}, question
    assert head_products(smol_replica.base_url, "1.0") < head_products(smol_replica.base_url, "+Inf")


def head_products(base_url: str, le: str) -> float:
    """How many LM head products the replica computed of at most ``le`` tokens (``+Inf``: all)."""
    families = text_string_to_metric_families(requests.get(f"{base_url}/metrics", timeout=10).text)
    (family,) = (family for family in families if family.name == "petals_chat_inference_head_batch_size")
    buckets = (sample for sample in family.samples if sample.name.endswith("_bucket"))
    (count,) = (sample.value for sample in buckets if sample.labels["le"] == le)
    return count
