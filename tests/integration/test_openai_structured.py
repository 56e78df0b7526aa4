"""Structured output and tools through the gateway on SmolLM2, with the official clients.

A private SmolLM2 swarm, one replica and a gateway. ``response_format`` (the Python client's
``chat.completions.parse`` with a Pydantic model, varied JSON Schemas, ``json_object`` on
completions, v2's ``json_schema``), tools (``required``, a named function, streamed calls the
client assembles, a ``role: "tool"`` follow-up that continues the conversation's session) and
the JS SDK's helpers (``zodResponseFormat``, ``runTools``, tests/js/). The 200-schema run is
``bench/structured_output.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
import requests
from pydantic import BaseModel

from client.api import Api
from client.schemas import schemas, strict_format
from services.swarm.launcher import PrivateSwarm
from services.swarm.smollm2 import ensure_smollm2
from tests.helpers import start_gateway, start_inference

pytestmark = pytest.mark.integration
DHT_PREFIX = "petals-chat-smollm2"
JS_TESTS = Path(__file__).resolve().parents[1] / "js"
CHATML_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
SAMPLE_SCHEMAS = 6  # of client/schemas.py's; the bench runs 200
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    return ensure_smollm2()


@pytest.fixture(scope="module")
def smol_gateway(smol_dir: Path, artifacts_dir: Path) -> Iterator[str]:
    """A gateway in front of a SmolLM2 replica on its own two-server swarm: the gateway's base URL."""
    with PrivateSwarm(smol_dir, ["0:15", "15:30"], artifacts_dir / "structured-swarm", dht_prefix=DHT_PREFIX) as swarm:
        replica = start_inference(swarm, smol_dir, artifacts_dir, "inference-structured", DHT_PREFIX=DHT_PREFIX)
        gateway = start_gateway(artifacts_dir, {"inference-structured": replica.base_url}, "gateway-structured")
        yield gateway.base_url
        gateway.stop()
        replica.stop()


@pytest.fixture(scope="module")
def client(smol_gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smol_gateway}/v1", api_key="not-needed", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(smol_dir: Path) -> str:
    return smol_dir.name


class City(BaseModel):
    name: str
    country: str
    population: int


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_parse_with_a_pydantic_model_returns_the_object(client, model):
    answer = client.chat.completions.parse(
        model=model, messages=ask("Describe Paris as JSON."), response_format=City, temperature=0, max_tokens=80
    )
    city = answer.choices[0].message.parsed
    assert isinstance(city, City) and city.name
    assert answer.choices[0].finish_reason == "stop"


def test_varied_schemas_always_validate(client, model):
    for index, schema in enumerate(schemas(SAMPLE_SCHEMAS, seed=1)):
        response_format = {"type": "json_schema", "json_schema": strict_format(index, schema)}
        answer = client.chat.completions.create(
            model=model, messages=ask("Fill in this form."), response_format=response_format, max_tokens=300,
            temperature=0.7, seed=index,
        )  # fmt: skip
        jsonschema.validate(json.loads(answer.choices[0].message.content), schema)


def test_json_object_on_completions(client, model):
    answer = client.completions.create(
        model=model, prompt=CHATML_PROMPT.format("Give a cat's name and age as a JSON object."), max_tokens=100,
        temperature=0, extra_body={"response_format": {"type": "json_object"}},
    )  # fmt: skip
    assert isinstance(json.loads(answer.choices[0].text), dict) and answer.choices[0].finish_reason == "stop"


def test_v2_stream_json_schema(smol_gateway, model):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    schema["additionalProperties"] = False
    body = {"inputs": CHATML_PROMPT.format("Is water wet?"), "max_new_tokens": 20, "model": model}
    body["json_schema"] = schema
    status, events = Api(smol_gateway).stream(body)
    assert status == 200 and events[-1][0] == "done", events
    assert isinstance(json.loads(events[-1][1]["outputs"])["ok"], bool)


def test_tool_choice_required_calls_a_tool(client, model):
    answer = client.chat.completions.create(
        model=model, messages=ask("What is the weather in Paris?"), tools=[WEATHER, TIME], tool_choice="required",
        parallel_tool_calls=False, temperature=0, max_tokens=80,
    )  # fmt: skip
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name in ("get_weather", "get_time")
    json.loads(call.function.arguments)


def test_named_tool_then_its_result_continues_the_session(client, model):
    messages = ask("What is the weather in Paris?")
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER, TIME], tool_choice=named, temperature=0, max_tokens=80
    )
    call = first.choices[0].message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    assert call.function.name == "get_weather" and first.choices[0].finish_reason == "tool_calls"
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    second = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER, TIME], temperature=0, max_tokens=30
    )
    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens  # the session went on
    assert second.choices[0].message.content or second.choices[0].message.tool_calls


def test_streamed_tool_calls_are_assembled_by_the_client(client, model):
    request = {"model": model, "tools": [WEATHER, TIME], "tool_choice": "required", "temperature": 0, "max_tokens": 120}
    with client.chat.completions.stream(messages=ask("Weather and time in Rome?"), **request) as stream:
        final = stream.get_final_completion()
    whole = client.chat.completions.create(messages=ask("Weather and time in Rome?"), **request)
    streamed, answered = final.choices[0].message.tool_calls, whole.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in streamed] == [
        (c.function.name, c.function.arguments) for c in answered
    ]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": strict_format(0, {"type": "strin"})}},
         "response_format.json_schema.schema", "strin"),
        ({"response_format": {"type": "json_schema", "json_schema": strict_format(0, {"format": "postal"})}},
         "response_format.json_schema.schema", "postal"),
        ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice", "nope"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}]},
         "tools[0].function.parameters", "objec"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format", "tools"),
        ({"tool_choice": "required"}, "tool_choice", "tools"),
    ],
)  # fmt: skip
def test_bad_schemas_and_conflicts_are_clear_400s(smol_gateway, model, body, param, words):
    response = requests.post(
        f"{smol_gateway}/v1/chat/completions", json={"model": model, "messages": ask("Hi"), **body}, timeout=30
    )
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and words in error["message"], error


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_js_sdk_zod_response_format_and_run_tools(smol_gateway, model):
    if not (JS_TESTS / "node_modules").is_dir():
        pytest.fail("tests/js/node_modules is missing: run `npm ci --prefix tests/js` (make test does)")
    result = subprocess.run(
        ["node", str(JS_TESTS / "structured.mjs")],
        env={"OPENAI_BASE_URL": f"{smol_gateway}/v1", "MODEL": model, "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "zodResponseFormat ok" in result.stdout and "runTools ok" in result.stdout
