"""The OpenAI API's scores, choices, penalties and tokenizer endpoints, on the tiny BLOOM through the
shared gateway and replica (the test swarm), against ``transformers`` in process.

Greedy log-probabilities must equal ``log_softmax`` of the in-process logits (to the swarm's float
differences); penalties and ``logit_bias`` must pick what a hand-written greedy loop over the same
logits picks; each of ``n`` sampled choices is reproducible with its seed; ``best_of`` returns the
choice of highest cumulative log-probability.
"""

from __future__ import annotations

import json

import openai
import pytest
import requests

pytestmark = pytest.mark.integration
TOLERANCE = 2e-4  # log-probabilities: the swarm's logits differ from in-process ones by about 6e-5
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def bloom(model_dir):
    """The tiny BLOOM in process: ``logprobs(ids) -> [len(ids), vocabulary]`` log-softmax of its logits."""
    import torch
    from transformers import BloomForCausalLM

    torch.set_num_threads(1)
    model = BloomForCausalLM.from_pretrained(model_dir).eval()

    def logprobs(ids: list[int]):
        with torch.inference_mode():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


@pytest.fixture(scope="module")
def model(model_dir) -> str:
    return model_dir.name


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="not-needed", max_retries=0, timeout=120)


def post(gateway, path: str, body: dict) -> requests.Response:
    return requests.post(f"{gateway.base_url}{path}", json=body, timeout=120)


def token_bytes(tokenizer, token_id: int) -> list[int]:
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    alphabet = {char: byte for byte, char in bytes_to_unicode().items()}
    return [alphabet[char] for char in tokenizer.convert_ids_to_tokens(token_id)]


def shaped_greedy(bloom, prompt: list[int], steps: int, presence: float, frequency: float, bias: dict[int, float]):
    """OpenAI's penalties and bias by hand over the in-process logits: (ids, the chosen ids' logprobs)."""
    import torch

    ids, scores = list(prompt), []
    for _ in range(steps):
        logits = torch.log_softmax(bloom(ids)[-1], dim=-1)  # a constant shift: the same softmax as the logits
        counts = torch.bincount(torch.tensor(ids[len(prompt) :], dtype=torch.long), minlength=logits.shape[0])
        shaped = logits - counts * frequency - (counts > 0).float() * presence
        for token, value in bias.items():
            shaped[token] += value
        token = int(shaped.argmax())
        scores.append(float(torch.log_softmax(shaped, dim=-1)[token]))
        ids.append(token)
    return ids[len(prompt) :], scores


def test_greedy_completion_logprobs_equal_log_softmax_of_transformers(gateway, model, tokenizer, oracle, bloom):
    prompt = tokenizer(PROMPT, add_special_tokens=False).input_ids
    expected = oracle(PROMPT, 8)
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 5}
    answer = post(gateway, "/v1/completions", body).json()
    logprobs = answer["choices"][0]["logprobs"]
    reference = bloom(prompt + expected)
    assert len(logprobs["token_logprobs"]) == 8
    for step, token in enumerate(expected):
        row = reference[len(prompt) - 1 + step]
        assert logprobs["token_logprobs"][step] == pytest.approx(float(row[token]), abs=TOLERANCE)
        top = row.topk(5)
        alternatives = logprobs["top_logprobs"][step]
        assert len(alternatives) in (5, 6)  # the five, and the chosen token if it is not one of them
        for value, token_id in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            text = bytes(token_bytes(tokenizer, token_id)).decode("utf-8", errors="replace")
            assert alternatives[text] == pytest.approx(value, abs=TOLERANCE)
    assert logprobs["text_offset"][0] == 0


def test_chat_logprobs_and_top_logprobs_equal_transformers(client, model, tokenizer, oracle, bloom):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]
    prompt = tokenizer("You are terse.\n\nHuman: Say hi\n\nAI:", add_special_tokens=False).input_ids
    answer = client.chat.completions.create(
        model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = answer.choices[0].logprobs.content
    expected = oracle(prompt, len(content))
    reference = bloom(prompt + expected)
    for step, (entry, token) in enumerate(zip(content, expected, strict=True)):
        row = reference[len(prompt) - 1 + step]
        assert entry.bytes == token_bytes(tokenizer, token)
        assert entry.logprob == pytest.approx(float(row[token]), abs=TOLERANCE)
        top = row.topk(3)
        assert [alternative.bytes for alternative in entry.top_logprobs] == [
            token_bytes(tokenizer, token_id) for token_id in top.indices.tolist()
        ]
        assert [alternative.logprob for alternative in entry.top_logprobs] == pytest.approx(
            top.values.tolist(), abs=TOLERANCE
        )


def test_penalties_and_logit_bias_equal_the_hand_computed_reference(gateway, model, tokenizer, bloom, decode):
    prompt = tokenizer(PROMPT, add_special_tokens=False).input_ids
    plain, _ = shaped_greedy(bloom, prompt, 10, 0.0, 0.0, {})
    bias = {plain[0]: -100.0, plain[2]: 3.5}  # ban the first greedy token, favour another
    expected, scores = shaped_greedy(bloom, prompt, 10, 1.5, 0.8, bias)
    shaping = {"presence_penalty": 1.5, "frequency_penalty": 0.8, "logit_bias": {str(k): v for k, v in bias.items()}}
    body = {"model": model, "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "logprobs": 0, **shaping}
    choice = post(gateway, "/v1/completions", body).json()["choices"][0]
    assert expected != plain
    assert choice["text"] == decode(expected)
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(scores, abs=TOLERANCE)


def test_n_choices_are_each_reproducible_with_the_seed(gateway, model):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 42, "n": 3}
    first = post(gateway, "/v1/completions", body).json()
    again = post(gateway, "/v1/completions", body).json()
    texts = [choice["text"] for choice in first["choices"]]
    assert [choice["index"] for choice in first["choices"]] == [0, 1, 2]
    assert texts == [choice["text"] for choice in again["choices"]]
    assert len(set(texts)) > 1  # three samples, not one repeated
    second_alone = post(gateway, "/v1/completions", {**body, "n": 1, "seed": 43}).json()
    assert second_alone["choices"][0]["text"] == texts[1]  # choice i samples with seed + i
    assert first["usage"]["completion_tokens"] == sum(6 for _ in texts)


def test_best_of_returns_the_choice_of_highest_cumulative_logprob(gateway, model):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 5, "temperature": 1.0, "seed": 7, "logprobs": 0}
    candidates = post(gateway, "/v1/completions", {**body, "n": 3}).json()["choices"]
    best = post(gateway, "/v1/completions", {**body, "best_of": 3}).json()
    assert all(choice["finish_reason"] == "length" for choice in candidates)  # no end token left out of the sums
    ranked = sorted(candidates, key=lambda choice: -sum(choice["logprobs"]["token_logprobs"]))
    assert [choice["text"] for choice in best["choices"]] == [ranked[0]["text"]]
    assert best["usage"]["completion_tokens"] == 15  # every candidate's tokens
    two = post(gateway, "/v1/completions", {**body, "best_of": 3, "n": 2}).json()
    assert [choice["text"] for choice in two["choices"]] == [choice["text"] for choice in ranked[:2]]


def test_echo_returns_the_prompt_and_its_scores(gateway, model, tokenizer, oracle, bloom):
    prompt = tokenizer(PROMPT, add_special_tokens=False).input_ids
    body = {"model": model, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "echo": True}
    plain = post(gateway, "/v1/completions", body).json()["choices"][0]
    scored = post(gateway, "/v1/completions", {**body, "logprobs": 1}).json()["choices"][0]
    assert plain["text"].startswith(PROMPT) and plain["logprobs"] is None
    assert scored["text"] == plain["text"]
    logprobs = scored["logprobs"]
    assert len(logprobs["tokens"]) == len(prompt) + 3
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    reference = bloom(prompt + oracle(PROMPT, 3))
    expected = [float(reference[index - 1][token]) for index, token in enumerate(prompt) if index]
    assert logprobs["token_logprobs"][1 : len(prompt)] == pytest.approx(expected, abs=TOLERANCE)
    streamed = requests.post(f"{gateway.base_url}/v1/completions", json={**body, "stream": True}, timeout=60)
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["text"] == PROMPT
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == plain["text"]


def test_the_openai_client_gets_logprobs_and_three_choices_streamed_and_whole(client, model):
    settings = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0.9,
                "seed": 11, "n": 3, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    whole = client.chat.completions.create(**settings)
    assert [choice.index for choice in whole.choices] == [0, 1, 2]
    for choice in whole.choices:
        assert choice.logprobs.content and all(len(entry.top_logprobs) == 2 for entry in choice.logprobs.content)
    texts, entries = {0: "", 1: "", 2: ""}, {0: 0, 1: 0, 2: 0}
    for chunk in client.chat.completions.create(**settings, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            entries[choice.index] += len(choice.logprobs.content) if choice.logprobs else 0
    assert [texts[index] for index in range(3)] == [choice.message.content for choice in whole.choices]
    assert [entries[index] for index in range(3)] == [len(choice.logprobs.content) for choice in whole.choices]


def test_tokenize_and_detokenize_round_trip(gateway, model, tokenizer):
    text = "Petals runs large language models, héhé 42."
    tokenized = post(gateway, "/v1/tokenize", {"model": model, "prompt": text}).json()
    assert tokenized["tokens"] == tokenizer(text).input_ids and tokenized["count"] == len(tokenized["tokens"])
    assert tokenized["max_model_len"] > 0
    assert post(gateway, "/v1/detokenize", {"model": model, "tokens": tokenized["tokens"]}).json() == {"prompt": text}
    chat = post(gateway, "/v1/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()  # default model
    assert chat["tokens"] == tokenizer("A human talks to a powerful AI that follows the human's instructions.\n\n"
                                       "Human: Hi\n\nAI:", add_special_tokens=False).input_ids  # fmt: skip
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]  # fmt: skip
    with_tools = post(gateway, "/v1/tokenize", {"messages": turns}).json()  # rendered as the chat endpoint renders it
    rendered = tokenizer.decode(with_tools["tokens"])
    assert "<tool_call>" in rendered and "<tool_response>\nsunny\n</tool_response>" in rendered


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions", {"n": 5}, "n"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/chat/completions", {"frequency_penalty": -3}, "frequency_penalty"),
        ("/v1/chat/completions", {"logit_bias": {"5": 150}}, "logit_bias"),
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        ("/v1/completions", {"best_of": 2, "stream": True}, "best_of"),
        ("/v1/completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),
        ("/v1/detokenize", {"tokens": [99999999]}, "tokens"),
        ("/v1/detokenize", {"tokens": "abc"}, "tokens"),
        ("/v1/tokenize", {}, "prompt"),
    ],
)
def test_out_of_range_values_are_refused_in_openais_shape(gateway, model, path, extra, param):
    base = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "prompt": "Hi", "max_tokens": 2}
    if "tokenize" in path:
        base = {"model": model}
    response = post(gateway, path, {**base, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and param in error["message"]
