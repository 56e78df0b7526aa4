"""The OpenAI-compatible API, driven by the official ``openai`` package over real HTTP.

The stack: the test swarm, two inference replicas and a gateway in front of both. Greedy
output must equal the v1 API's for the same prompt (and the in-process oracle); a follow-up
chat turn must continue the conversation's session (seen in the replicas' metrics).
"""

from __future__ import annotations

import openai
import pytest
import requests

from client.api import Api
from deploy.local_stack import gateway_process, pick_free_port
from tests.helpers import CHATML_MODEL, dedicated_stack, metric_value, start_gateway, start_inference

CHAT_STOP = "\n\nHuman:"  # the human-ai chat format's stop sequence
PREAMBLE = "A human talks to a powerful AI that follows the human's instructions."


@pytest.fixture(scope="module")
def replicas(inference, swarm, model_dir, artifacts_dir):
    """Two replicas of the default model, inference-0 (shared) and one started for this module: {id: base URL}."""
    second = start_inference(swarm, model_dir, artifacts_dir, "openai-1")
    yield {"inference-0": inference.base_url, "openai-1": second.base_url}
    second.stop()


@pytest.fixture(scope="module")
def stack(replicas, chatml_inference, artifacts_dir):
    """A gateway in front of both, and of the replica of a second model (the ChatML one)."""
    gateway = start_gateway(artifacts_dir, {**replicas, chatml_inference.name: chatml_inference.base_url},
                            "gateway-openai")  # fmt: skip
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def v1(stack) -> Api:
    return Api(stack.base_url)


@pytest.fixture(scope="module")
def model(model_dir) -> str:
    return model_dir.name  # MODEL_NAME defaults to the model directory's name


def total_metric(replicas: dict[str, str], name: str) -> float:
    """A counter summed over every replica."""
    return sum(metric_value(requests.get(f"{url}/metrics", timeout=10).text, name) for url in replicas.values())


def test_models_lists_the_served_models(client, model):
    assert [entry.id for entry in client.models.list().data] == [model, CHATML_MODEL]


def test_completion_greedy_equals_v1_and_the_oracle(client, v1, model, tokenizer, oracle, decode):
    prompt = "The quick brown fox"
    answer = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    legacy = v1.generate(inputs=prompt, max_new_tokens=12, do_sample=0)["outputs"]
    assert answer.choices[0].text == legacy == decode(oracle(prompt, 12))
    assert answer.choices[0].finish_reason == "length"
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, 12)
    assert answer.usage.total_tokens == prompt_tokens + 12
    assert answer.object == "text_completion" and answer.model == model and answer.id.startswith("cmpl-")


def test_completion_stream_equals_the_whole_answer(client, model):
    prompt = "Petals runs large language models"
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
    usage = {"include_usage": True}
    chunks = list(
        client.completions.create(
            model=model, prompt=prompt, max_tokens=10, temperature=0, stream=True, stream_options=usage
        )
    )
    text_chunks = [chunk for chunk in chunks if chunk.choices]
    assert "".join(chunk.choices[0].text for chunk in text_chunks) == whole.choices[0].text
    assert len(text_chunks) >= 5  # it streamed, token by token
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_ends_with_done(stack, model):
    body = {"model": model, "prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": True}
    response = requests.post(f"{stack.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    assert response.content.decode().endswith("data: [DONE]\n\n")


def test_chat_greedy_equals_v1_on_the_rendered_prompt(client, v1, model):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    prompt = "You are terse.\n\nHuman: Say hi\n\nAI:"
    legacy = v1.generate(inputs=prompt, max_new_tokens=10, do_sample=0, stop=CHAT_STOP)["outputs"]
    assert answer.choices[0].message.content == legacy
    assert answer.choices[0].message.role == "assistant"
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")


def test_chat_is_rendered_in_the_routed_models_format(client, v1):
    """The second model speaks ChatML: its chat prompt is ChatML (its system prompt when the chat
    has none), its default stop <|im_end|>."""
    user = "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
    for system, prompt in [
        ([{"role": "system", "content": "You are terse."}], "<|im_start|>system\nYou are terse.<|im_end|>\n" + user),
        ([], "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n" + user),
    ]:
        messages = [*system, {"role": "user", "content": "Say hi"}]
        answer = client.chat.completions.create(model=CHATML_MODEL, messages=messages, max_tokens=10, temperature=0)
        legacy = v1.generate(inputs=prompt, max_new_tokens=10, do_sample=0, stop="<|im_end|>", model=CHATML_MODEL)
        assert answer.choices[0].message.content == legacy["outputs"] and answer.model == CHATML_MODEL


def test_chat_without_system_message_gets_the_preamble(client, v1, model):
    messages = [{"role": "user", "content": "What is a petal?"}]
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    prompt = f"{PREAMBLE}\n\nHuman: What is a petal?\n\nAI:"
    legacy = v1.generate(inputs=prompt, max_new_tokens=6, do_sample=0, stop=CHAT_STOP)["outputs"]
    assert answer.choices[0].message.content == legacy


def test_chat_stream_equals_the_whole_answer(client, model):
    messages = [{"role": "user", "content": "Count to three"}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)


def test_stop_sequence_ends_the_answer_with_finish_reason_stop(client, model):
    prompt = "Once upon a time"
    full = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    start = next(i for i in range(2, len(full) - 3) if full[i:].strip() and full.find(full[i : i + 3]) == i)
    stop = full[start : start + 3]
    answer = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert answer.choices[0].text == full[:start]
    assert answer.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client, model):
    def sample(seed: int) -> str:
        answer = client.completions.create(model=model, prompt="Tell me", max_tokens=12, temperature=1.0, seed=seed)
        return answer.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert {sample(seed) for seed in (1, 2, 3)} != {first}  # other seeds: other samples


def test_follow_up_turn_continues_the_session(client, v1, model, replicas, tokenizer):
    first_turn = [{"role": "user", "content": "Tell me about the swarm"}]
    first = client.chat.completions.create(model=model, messages=first_turn, max_tokens=8, temperature=0)
    reply = first.choices[0].message.content
    follow_up = [*first_turn, {"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    sent_before = total_metric(replicas, "petals_chat_prompt_tokens_total")
    hits_before = total_metric(replicas, 'petals_chat_conversation_lookups_total{result="hit"}')
    second = client.chat.completions.create(model=model, messages=follow_up, max_tokens=8, temperature=0)

    first_prompt = f"{PREAMBLE}\n\nHuman: Tell me about the swarm\n\nAI:"
    rest = "\n\nHuman: And then?\n\nAI:"
    held = len(tokenizer(first_prompt, add_special_tokens=False).input_ids) + first.usage.completion_tokens
    rest_tokens = len(tokenizer(rest, add_special_tokens=False).input_ids)
    assert total_metric(replicas, "petals_chat_prompt_tokens_total") - sent_before == rest_tokens
    assert total_metric(replicas, 'petals_chat_conversation_lookups_total{result="hit"}') == hits_before + 1
    assert second.usage.prompt_tokens_details.cached_tokens == held
    assert second.usage.prompt_tokens == held + rest_tokens

    # The same two steps in one v1 session give the same answers.
    session_id = v1.open_session(256)
    step = {"session_id": session_id, "max_new_tokens": 8, "do_sample": 0, "stop": CHAT_STOP}
    assert v1.generate(inputs=first_prompt, **step)["outputs"] == reply
    assert v1.generate(inputs=rest, **step)["outputs"] == second.choices[0].message.content
    v1.close_session(session_id)


def test_follow_up_with_the_clients_defaults_continues_the_session(swarm, model_dir, artifacts_dir, tokenizer, model):
    """The official client sends no max_tokens by default: the gateway asks for as many tokens as
    the context allows (capped by the replica's MAX_NEW_TOKENS_LIMIT) and the follow-up turn still
    continues the conversation's session (it used to send max_length=<limit>, which never did)."""
    limits = {"shared_env": {"MAX_LENGTH_LIMIT": "256"}, "inference_env": {"MAX_NEW_TOKENS_LIMIT": "16"}}
    with dedicated_stack(swarm, model_dir, artifacts_dir, "openai-defaults", **limits) as stack:
        client = openai.OpenAI(base_url=f"{stack.gateway.base_url}/v1", api_key="x", max_retries=0, timeout=60)
        replica = {"replica": stack.replicas[0].base_url}
        first_turn = [{"role": "user", "content": "Tell me about the swarm"}]
        first = client.chat.completions.create(model=model, messages=first_turn, temperature=0)
        reply = first.choices[0].message.content
        follow_up = [*first_turn, {"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
        sent_before = total_metric(replica, "petals_chat_prompt_tokens_total")
        second = client.chat.completions.create(model=model, messages=follow_up, temperature=0)
        rest_tokens = len(tokenizer("\n\nHuman: And then?\n\nAI:", add_special_tokens=False).input_ids)
        assert total_metric(replica, "petals_chat_prompt_tokens_total") - sent_before == rest_tokens
        assert second.usage.prompt_tokens_details.cached_tokens == first.usage.total_tokens > 0
        assert first.usage.completion_tokens == 16 and first.choices[0].finish_reason == "length"


def test_edited_history_starts_a_new_session(client, v1, model):
    first_turn = [{"role": "user", "content": "Name a flower"}]
    reply = client.chat.completions.create(model=model, messages=first_turn, max_tokens=6, temperature=0)
    edited = [*first_turn, {"role": "assistant", "content": " A rose, edited"}, {"role": "user", "content": "Why?"}]
    answer = client.chat.completions.create(model=model, messages=edited, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content != " A rose, edited"
    assert answer.usage.prompt_tokens_details.cached_tokens == 0
    prompt = f"{PREAMBLE}\n\nHuman: Name a flower\n\nAI: A rose, edited\n\nHuman: Why?\n\nAI:"
    legacy = v1.generate(inputs=prompt, max_new_tokens=6, do_sample=0, stop=CHAT_STOP)["outputs"]
    assert answer.choices[0].message.content == legacy


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"n": 5}, "n"),  # over OPENAI_MAX_CHOICES
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
    ],
)
def test_bad_chat_requests_raise_bad_request(client, model, overrides, param):
    request = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **overrides}
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(**request)
    assert raised.value.status_code == 400
    assert raised.value.param == param and raised.value.type == "invalid_request_error"
    assert param.split("[")[0] in raised.value.message


def test_wrong_type_is_a_bad_request(client, model):
    with pytest.raises(openai.BadRequestError, match="max_tokens must be an integer"):
        client.completions.create(model=model, prompt="Hi", max_tokens="many")  # type: ignore[arg-type]


def test_unknown_model_is_not_found(client, model):
    with pytest.raises(openai.NotFoundError, match=model) as raised:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert raised.value.code == "model_not_found"


def test_huge_prompt_is_refused_with_413(client, model):
    with pytest.raises(openai.APIStatusError, match="the limit is") as raised:
        client.completions.create(model=model, prompt="x" * 20_000, max_tokens=2)
    assert raised.value.status_code == 413


def test_prompt_longer_than_the_context_is_a_bad_request(client, model):
    with pytest.raises(openai.BadRequestError, match="exceeds the limit"):
        client.completions.create(model=model, prompt="word " * 3000, max_tokens=1000)


def test_rate_limit_raises_rate_limit_error(replicas, artifacts_dir, model):
    gateway = start_gateway(
        artifacts_dir, replicas, "gateway-openai-limited", RATE_LIMIT_PER_MINUTE="1", RATE_LIMIT_BURST="1",
        GUNICORN_WORKERS="1",
    )  # fmt: skip
    try:
        limited = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0, timeout=60)
        limited.models.list()
        with pytest.raises(openai.RateLimitError) as raised:
            limited.models.list()
        assert raised.value.status_code == 429 and raised.value.type == "rate_limit_error"
    finally:
        gateway.stop()


def test_no_ready_replica_raises_server_error(artifacts_dir, model):
    gateway = gateway_process(
        replicas={"inference-9": f"http://127.0.0.1:{pick_free_port()}"},  # nothing listens there
        port=pick_free_port(),
        log_path=artifacts_dir / "logs" / "gateway-openai-alone.log",
        name="gateway-openai-alone",
    )
    gateway.start_ready(timeout=60, path="/healthz")
    try:
        alone = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0, timeout=60)
        assert alone.models.list().data == []
        with pytest.raises(openai.InternalServerError, match="retry in a few seconds") as raised:
            alone.completions.create(model=model, prompt="Hi", max_tokens=2)
        assert raised.value.status_code == 503 and raised.value.response.headers["Retry-After"]
    finally:
        gateway.stop()
