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
from services.swarm.smollm2 import ensure_smollm2
from tests.helpers import start_gateway, start_inference

pytestmark = pytest.mark.integration
DHT_PREFIX = "petals-chat-smollm2"
NEW_TOKENS = 24
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    return ensure_smollm2()


@pytest.fixture(scope="module")
def smol_tokenizer(smol_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


def chatml(tokenizer, question: str) -> list[int]:
    """The prompt's ids: the model's own chat template, default system prompt, assistant turn open."""
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def smol_model(smol_dir: Path):
    """The model in process, float32, one thread."""
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)  # two threads on two busy cores ran 20x slower
    return LlamaForCausalLM.from_pretrained(smol_dir, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smol_oracle(smol_model):
    """In-process greedy generation: ``oracle(ids) -> new ids`` (up to and including ``<|im_end|>``)."""
    import torch

    model = smol_model

    def generate(ids: list[int]) -> list[int]:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        return out[0, len(ids) :].tolist()

    return generate


@pytest.fixture(scope="module")
def smol_swarm(smol_dir: Path, artifacts_dir: Path) -> Iterator[PrivateSwarm]:
    with PrivateSwarm(smol_dir, ["0:15", "15:30"], artifacts_dir / "smollm2-swarm", dht_prefix=DHT_PREFIX) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def client(smol_dir: Path, smol_swarm: PrivateSwarm):
    """The raw Petals client (embeddings and the tied LM head here, the 30 blocks on the swarm)."""
    import torch
    from petals import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(
        smol_dir, initial_peers=smol_swarm.initial_peers, dht_prefix=DHT_PREFIX, torch_dtype=torch.float32
    ).eval()
    yield model
    sequence_manager = model.transformer.h.sequence_manager
    sequence_manager.shutdown()
    sequence_manager.dht.shutdown()


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
def test_swarm_generate_equals_oracle(client, cases, question):
    import torch

    ids, expected = cases[question]
    with torch.inference_mode():
        out = client.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out[0, len(ids) :].tolist() == expected


@pytest.mark.parametrize("question", QUESTIONS)
def test_swarm_one_token_per_call_in_a_session_equals_oracle(client, cases, question):
    import torch

    ids, expected = cases[question]
    generated: list[int] = []
    with torch.inference_mode(), client.inference_session(max_length=len(ids) + NEW_TOKENS) as session:
        out = client.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False, session=session)
        generated.append(out[0, -1].item())
        while len(generated) < len(expected):
            out = client.generate(None, max_new_tokens=1, do_sample=False, session=session)
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
