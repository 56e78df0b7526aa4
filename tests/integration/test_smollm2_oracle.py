"""SmolLM2-135M-Instruct through a private swarm of two servers equals in-process ``transformers``.

Greedy, float32, on ChatML prompts whose greedy margins are far above the swarm's float
differences (about 6e-5 in the logits): the raw Petals client in one ``generate`` call and one
token per call inside one inference session, then the inference service over HTTP, and the
OpenAI API's greedy log-probabilities through a gateway against ``log_softmax`` of the in-process logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from client.api import Api
from deploy.local_stack import ServiceProcess
from services.swarm.launcher import PrivateSwarm
from tests.helpers import SMOL_DHT_PREFIX, SMOL_NEW_TOKENS, SMOL_QUESTIONS, chatml, start_gateway, start_inference

pytestmark = pytest.mark.integration
DHT_PREFIX = SMOL_DHT_PREFIX
NEW_TOKENS = SMOL_NEW_TOKENS
QUESTIONS = SMOL_QUESTIONS


@pytest.fixture(scope="module")
def smol_swarm(smol_dir: Path, artifacts_dir: Path) -> Iterator[PrivateSwarm]:
    with PrivateSwarm(smol_dir, ["0:15", "15:30"], artifacts_dir / "smollm2-swarm", dht_prefix=DHT_PREFIX) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def cases(smol_tokenizer, smol_oracle) -> dict[str, tuple[list[int], list[int]]]:
    """question -> (prompt ids, the oracle's new ids)."""
    prompts = {question: chatml(smol_tokenizer, question) for question in QUESTIONS}
    return {question: (ids, smol_oracle(ids)) for question, ids in prompts.items()}


def test_the_oracle_answers_sensibly(cases, smol_tokenizer):
    _, france = cases[QUESTIONS[0]]
    assert france[-1] == smol_tokenizer.eos_token_id
    assert "Paris" in smol_tokenizer.decode(france, skip_special_tokens=True)
    assert len(cases[QUESTIONS[1]][1]) == NEW_TOKENS  # the haiku runs to the limit: a long comparison


@pytest.mark.parametrize("question", QUESTIONS)
def test_swarm_generate_equals_oracle(smol_client, cases, question):
    import torch

    ids, expected = cases[question]
    with torch.inference_mode():
        out = smol_client.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out[0, len(ids) :].tolist() == expected


@pytest.mark.parametrize("question", QUESTIONS)
def test_swarm_one_token_per_call_in_a_session_equals_oracle(smol_client, cases, question):
    import torch

    ids, expected = cases[question]
    generated: list[int] = []
    with torch.inference_mode(), smol_client.inference_session(max_length=len(ids) + NEW_TOKENS) as session:
        out = smol_client.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False, session=session)
        generated.append(out[0, -1].item())
        while len(generated) < len(expected):
            out = smol_client.generate(None, max_new_tokens=1, do_sample=False, session=session)
            generated.append(out[0, -1].item())
    assert generated == expected


@pytest.fixture(scope="module")
def smol_service(smol_swarm: PrivateSwarm, smol_dir: Path, artifacts_dir: Path) -> Iterator[ServiceProcess]:
    service = start_inference(smol_swarm, smol_dir, artifacts_dir, "inference-smollm2", DHT_PREFIX=DHT_PREFIX)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def smol_gateway(smol_service: ServiceProcess, artifacts_dir: Path) -> Iterator[ServiceProcess]:
    gateway = start_gateway(artifacts_dir, {"inference-smollm2": smol_service.base_url}, "gateway-smollm2")
    yield gateway
    gateway.stop()


def test_inference_service_answers_the_france_question(smol_service, cases, smol_tokenizer):
    """The service loads the Llama model through Petals' auto classes and stops at ``<|im_end|>``."""
    ids, expected = cases[QUESTIONS[0]]
    body = Api(smol_service.base_url).generate(inputs=smol_tokenizer.decode(ids), max_new_tokens=NEW_TOKENS)
    answer = smol_tokenizer.decode(expected, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert body == {"ok": True, "outputs": answer}
    assert "Paris" in answer


def test_openai_greedy_logprobs_equal_log_softmax_of_transformers(smol_gateway, smol_model, cases, smol_dir):
    """Chat ``logprobs`` with ``top_logprobs`` through the gateway: each generated token's score and its
    five best alternatives (ids by their bytes) equal ``log_softmax`` of the in-process logits."""
    import openai
    import torch

    ids, expected = cases[QUESTIONS[0]]
    client = openai.OpenAI(base_url=f"{smol_gateway.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.chat.completions.create(
        model=smol_dir.name, messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0,
        max_tokens=NEW_TOKENS, logprobs=True, top_logprobs=5,
    )  # fmt: skip
    content = answer.choices[0].logprobs.content
    assert len(content) == len(expected) - 1  # every token but the closing <|im_end|>
    with torch.inference_mode():
        reference = torch.log_softmax(smol_model(torch.tensor([ids + expected])).logits[0].float(), dim=-1)
    for step, entry in enumerate(content):
        row = reference[len(ids) - 1 + step]
        assert entry.logprob == pytest.approx(float(row[expected[step]]), abs=2e-4)
        top = row.topk(5)
        assert [alternative.logprob for alternative in entry.top_logprobs] == pytest.approx(
            top.values.tolist(), abs=2e-4
        )
        assert entry.top_logprobs[0].bytes == entry.bytes  # greedy: the chosen token is the best
