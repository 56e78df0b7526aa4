"""The WebSocket API's messages and step rule, on their own (no connection, no replica)."""

from __future__ import annotations

import json

import pytest

from services.common.api.params import MAX_STOP_CHARS, MAX_STOP_SEQUENCES, Limits
from services.common.api.step_rule import StepAnswer
from services.common.startup.config import Env
from services.common.web.errors import InvalidParameter, PayloadTooLarge
from services.gateway.settings import GatewaySettings
from services.gateway.socket_protocol import (
    largest_message_bytes,
    parse_generate_message,
    parse_message,
    parse_open,
)
from services.gateway.worker import WS_TRANSPORT_FACTOR

LIMITS = Limits()
SESSION = "inference-0.abc"


def generate(**message) -> StepAnswer:
    request = parse_generate_message({"type": "generate", **message}, SESSION, LIMITS)
    return StepAnswer(request.params, request.stops, session_max_length=message.pop("session_max_length", 64))


def done(outputs: str, generated: int = 1, *, cached: int = 10, prompt: int = 0, reason: str = "length") -> dict:
    return {"outputs": outputs, "generated_tokens": generated, "cached_tokens": cached, "prompt_tokens": prompt,
            "finish_reason": reason}  # fmt: skip


def test_messages_must_be_json_objects_of_a_known_type_within_the_limit():
    assert parse_message('{"type": "generate"}', 100) == {"type": "generate"}
    for data, fragment in [
        (b"\x00", "binary message"),
        ("{", "not valid JSON"),
        ("[]", "JSON object"),
        ('{"type": "chat"}', "Message type must be"),
    ]:
        with pytest.raises(InvalidParameter, match=fragment):
            parse_message(data, 100)
    message = json.dumps({"type": "generate", "inputs": "é" * 40}, ensure_ascii=False)  # 2 bytes a character
    with pytest.raises(PayloadTooLarge, match=f"Message is {len(message.encode())} bytes; the limit is 100"):
        parse_message(message, 100)


def test_open_and_generate_messages_are_validated_like_v1():
    assert parse_open({"type": "open_inference_session", "max_length": 8}, LIMITS).max_length == 8
    with pytest.raises(InvalidParameter, match="max_length is required"):
        parse_open({"type": "open_inference_session"}, LIMITS)
    request = parse_generate_message({"type": "generate", "inputs": "Hi", "max_new_tokens": 2,
                                      "repetition_penalty": 1.2}, SESSION, LIMITS)  # fmt: skip
    assert request.params.session_id == SESSION and request.params.repetition_penalty == 1.2
    assert parse_generate_message({"type": "generate", "max_new_tokens": 1}, SESSION, LIMITS).params.inputs is None
    for message, fragment in [
        ({"max_new_tokens": 1, "session_id": "x.y"}, "session_id is not a parameter here"),
        ({"max_new_tokens": 1, "stop": "x"}, "use stop_sequence"),
        ({"max_new_tokens": 1, "extra_stop_sequences": ["x"]}, "require stop_sequence"),
        ({"max_new_tokens": 1, "stop_sequence": ""}, "stop_sequence must be"),
        ({"max_new_tokens": 1, "stop_sequence": "a", "extra_stop_sequences": "b"}, "must be a list"),
        ({}, "Set exactly one of max_length or max_new_tokens"),
    ]:
        with pytest.raises(InvalidParameter, match=fragment):
            parse_generate_message({"type": "generate", **message}, SESSION, LIMITS)


def test_without_a_stop_sequence_one_answer():
    answer = generate(inputs="Hi", max_new_tokens=5)
    assert answer.next_params().inputs == "Hi"
    assert answer.after_step(done("hello", 5)) == {"ok": True, "outputs": "hello", "stop": True, "token_count": 5}
    assert answer.done


def test_steps_until_the_text_ends_with_the_stop_sequence():
    answer = generate(inputs="Hi", max_new_tokens=1, stop_sequence="\n\n")
    messages = [answer.after_step(done(text)) for text in ["A", "\n", "", "\n"]]
    assert answer.next_params().inputs is None  # inputs go with the first step only
    assert messages == [
        {"ok": True, "outputs": "A", "stop": False, "token_count": 1},
        {"ok": True, "outputs": "\n", "stop": False, "token_count": 1},
        None,  # a token that released no text yet (part of a character): its count goes with the next
        {"ok": True, "outputs": "\n", "stop": True, "token_count": 2},
    ]


def test_an_extra_stop_sequence_ends_it_and_marks_the_continuation():
    answer = generate(max_new_tokens=1, stop_sequence="</s>", extra_stop_sequences=["Human:"])
    assert answer.after_step(done("Hum"))["stop"] is False
    assert answer.after_step(done("an:"))["stop"] is True and answer.ended_by_extra


@pytest.mark.parametrize(
    ("step", "ends"),
    [
        (done("x", cached=60, prompt=2, generated=1), False),  # 63 held: room for one more step of 1
        (done("x", cached=61, prompt=2, generated=1), True),  # 64 held: full
        (done("x", reason="eos"), True),  # the model ended its text
        (done("", generated=0), True),
    ],
)
def test_the_answer_ends_when_nothing_more_can_come(step, ends):
    answer = generate(max_new_tokens=1, stop_sequence="never")
    answer.after_step(step)
    assert answer.done is ends


def test_a_max_length_answer_is_one_step():
    answer = generate(inputs="Hi", max_length=30, stop_sequence="never")
    assert answer.after_step(done("text", 20))["stop"] is True


def largest_message(limits: Limits) -> str:
    """A valid generate message with every string at its longest, in JSON's longest spelling (an escaped
    surrogate pair per character) and every other parameter set."""
    astral = "\U0001f600"
    stop = astral * MAX_STOP_CHARS
    return json.dumps({
        "type": "generate", "inputs": astral * limits.max_input_chars, "max_new_tokens": limits.max_new_tokens,
        "do_sample": True, "temperature": 99.99999999999999, "top_k": 999999, "top_p": 0.9999999999999999,
        "repetition_penalty": 9.999999999999998, "seed": 2**63 - 1, "model": "m" * 128,
        "stop_sequence": stop, "extra_stop_sequences": [stop] * MAX_STOP_SEQUENCES,
    }, indent=1)  # fmt: skip


@pytest.mark.parametrize("limits", [LIMITS, Limits(max_input_chars=10)], ids=["defaults", "small"])
def test_the_message_limit_fits_the_largest_valid_message(limits):
    """WS_MAX_MESSAGE_BYTES' default is the largest valid message's size, computed from the limits (not the
    4x-larger MAX_BODY_BYTES it was): 204,544 bytes by default, so the transport (2x) refuses 400 KiB."""
    settings = GatewaySettings.from_env(Env({"INFERENCE_REPLICAS": "i=http://127.0.0.1:1",
                                             "MAX_INPUT_CHARS": str(limits.max_input_chars)}))  # fmt: skip
    data = largest_message(limits)
    message = parse_message(data, settings.ws_max_message_bytes)
    assert parse_generate_message(message, SESSION, limits).params.inputs == "\U0001f600" * limits.max_input_chars
    assert len(data.encode()) <= settings.ws_max_message_bytes == largest_message_bytes(limits)
    assert settings.ws_max_message_bytes - len(data.encode()) < 4096  # a tight bound, not a generous one
    if limits == LIMITS:
        assert settings.ws_max_message_bytes == 204_544 and WS_TRANSPORT_FACTOR * 204_544 < 400 * 1024
