"""Continuous batching (SWARM_BATCHING) on a private SmolLM2 swarm equals in-process ``transformers``.

Two batching servers split the 30 blocks; the stock Petals client (``client`` of
test_smollm2_oracle.py, resolved against this module's ``smol_swarm``) runs many sessions at once
from threads, of different lengths, joining and leaving while others decode: each session's greedy
tokens equal the oracle's, and both servers' logs show batched steps. A beam search (``hypo_ids``
reordering, two sequences per step) and every session's prefill take Petals' own step on the same
servers, interleaved with batched ones.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.swarm.batching_pool import ENV, PATCH
from services.swarm.launcher import PrivateSwarm
from tests.integration.test_smollm2_oracle import (  # noqa: F401 - fixtures shared with the unbatched oracle test
    DHT_PREFIX,
    NEW_TOKENS,
    QUESTIONS,
    chatml,
    client,
    smol_dir,
    smol_oracle,
    smol_tokenizer,
)

pytestmark = pytest.mark.integration
MORE_QUESTIONS = [*QUESTIONS, "What is 2 + 2?", "Name three colors."]
SESSION_TOKENS = [24, 6, 16, 10, 20, 8]  # session i asks MORE_QUESTIONS[i % 4] for this many tokens at most
JOIN_AFTER = 3  # session i opens once the sessions before it have made 3 * i tokens in all
BATCHED = f"{PATCH}: the first batched step of"


@pytest.fixture(scope="module")
def smol_swarm(smol_dir: Path, artifacts_dir: Path) -> Iterator[PrivateSwarm]:  # noqa: F811 - this module's swarm
    with PrivateSwarm(smol_dir, ["0:15", "15:30"], artifacts_dir / "smollm2-batching-swarm", dht_prefix=DHT_PREFIX,
                      env={ENV: "true"}) as swarm:  # fmt: skip
        yield swarm


@pytest.fixture(scope="module")
def oracle_cases(smol_tokenizer, smol_oracle) -> dict[str, tuple[list[int], list[int]]]:  # noqa: F811
    """question -> (prompt ids, the oracle's NEW_TOKENS greedy ids)."""
    prompts = {question: chatml(smol_tokenizer, question) for question in MORE_QUESTIONS}
    return {question: (ids, smol_oracle(ids)) for question, ids in prompts.items()}


def one_token_per_call(client, ids: list[int], count: int) -> list[int]:  # noqa: F811
    """Greedy tokens of ``ids``, one per ``generate`` call in one inference session, ``count`` at most."""
    import torch

    generated: list[int] = []
    with torch.inference_mode(), client.inference_session(max_length=len(ids) + NEW_TOKENS) as session:
        out = client.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False, session=session)
        generated.append(out[0, -1].item())
        while len(generated) < count:
            out = client.generate(None, max_new_tokens=1, do_sample=False, session=session)
            generated.append(out[0, -1].item())
    return generated


def test_concurrent_sessions_joining_and_leaving_equal_the_oracle(client, oracle_cases, smol_swarm):  # noqa: F811
    made = threading.Condition()
    tokens_made = [0]
    results: dict[int, list[int] | BaseException] = {}

    def session(index: int) -> None:
        ids, expected = oracle_cases[MORE_QUESTIONS[index % len(MORE_QUESTIONS)]]
        with made:
            made.wait_for(lambda: tokens_made[0] >= JOIN_AFTER * index, timeout=300)
        try:
            results[index] = one_token_per_call(client, ids, min(SESSION_TOKENS[index], len(expected)))
        except BaseException as error:  # reported below, with the session's index
            results[index] = error
        with made:
            tokens_made[0] += len(results[index]) if isinstance(results[index], list) else 0
            made.notify_all()

    threads = [threading.Thread(target=session, args=(index,)) for index in range(len(SESSION_TOKENS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    for index, count in enumerate(SESSION_TOKENS):
        _, expected = oracle_cases[MORE_QUESTIONS[index % len(MORE_QUESTIONS)]]
        assert results[index] == expected[:count], f"session {index}"
    for server in smol_swarm.servers:
        assert BATCHED in server.log_path.read_text(errors="replace"), f"{server.name} never batched a step"


def test_beam_search_falls_back_beside_a_batched_session_and_equals_transformers(client, oracle_cases, smol_dir):  # noqa: F811
    """Two sequences a step and ``hypo_ids`` reordering: Petals' own step, beside a session that batches."""
    import torch
    from transformers import LlamaForCausalLM

    ids, expected = oracle_cases[QUESTIONS[1]]
    beams: dict[str, list[int]] = {}
    greedy = threading.Thread(target=lambda: beams.setdefault("greedy", one_token_per_call(client, ids, 12)))
    greedy.start()
    with torch.inference_mode():
        out = client.generate(torch.tensor([ids]), max_new_tokens=8, num_beams=2, do_sample=False)
    greedy.join(timeout=600)
    model = LlamaForCausalLM.from_pretrained(smol_dir, torch_dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = model.generate(torch.tensor([ids]), max_new_tokens=8, num_beams=2, do_sample=False)
    assert out[0, len(ids) :].tolist() == reference[0, len(ids) :].tolist()
    assert beams["greedy"] == expected[:12]
