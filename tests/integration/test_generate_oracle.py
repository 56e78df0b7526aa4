"""Generation through the HTTP API equals transformers' in-process generation on the same weights."""

from __future__ import annotations

import pytest
import requests

from services.common.web.sse import parse_sse

PROMPTS = ["A human talks to a powerful AI", "Human: Hi! Can you tell me what Petals is?\n\nAI:"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_one_call_equals_oracle(api, oracle, decode, prompt):
    expected = decode(oracle(prompt, 24))
    body = api.generate(inputs=prompt, max_new_tokens=24)
    assert body == {"ok": True, "outputs": expected}


def test_max_length_counts_the_prompt(api, oracle, decode, tokenizer):
    prompt = PROMPTS[0]
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    body = api.generate(inputs=prompt, max_length=prompt_tokens + 10)
    assert body == {"ok": True, "outputs": decode(oracle(prompt, 10))}


def test_session_continued_one_token_per_call_equals_oracle(api, oracle, decode_partial):
    prompt, total = PROMPTS[1], 30
    session_id = api.open_session(max_length=128)
    pieces = [api.generate(inputs=prompt, max_new_tokens=1, session_id=session_id)["outputs"]]
    for _ in range(total - 1):
        body = api.generate(max_new_tokens=1, session_id=session_id)  # no inputs: continue
        assert body["ok"], body
        pieces.append(body["outputs"])
    api.close_session(session_id)
    expected = decode_partial(oracle(prompt, total))
    # Incomplete UTF-8 at the very end stays held back in the session; everything else matches.
    assert "".join(pieces) == expected
    assert len(expected) > 10


def test_session_with_new_inputs_continues_the_dialogue(api, oracle, decode_partial, tokenizer):
    first, second = "Human: Hi!\n\nAI:", " Hello.\n\nHuman: List the planets.\n\nAI:"
    session_id = api.open_session(max_length=256)
    part1 = api.generate(inputs=first, max_new_tokens=8, session_id=session_id)
    part2 = api.generate(inputs=second, max_new_tokens=8, session_id=session_id)
    api.close_session(session_id)
    assert part1["ok"] and part2["ok"]
    tokens = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    ids1 = oracle(first, 8)
    assert part1["outputs"] == decode_partial(ids1)
    # The second turn sees the first prompt, the first answer's tokens, then the new input.
    assert part2["outputs"] == decode_partial(oracle(tokens(first) + ids1 + tokens(second), 8))


def test_sampling_works_and_top_k_1_equals_greedy(api, oracle, decode):
    prompt = PROMPTS[0]
    sampled = api.generate(inputs=prompt, max_new_tokens=16, do_sample=1, temperature=0.9, top_p=0.95)
    assert sampled["ok"] and isinstance(sampled["outputs"], str)
    samples = {
        api.generate(inputs=prompt, max_new_tokens=16, do_sample=1, temperature=1.5)["outputs"] for _ in range(4)
    }
    assert len(samples) > 1, "sampling at temperature 1.5 gave the same text four times"
    top1 = api.generate(inputs=prompt, max_new_tokens=16, do_sample=1, top_k=1, temperature=0.7)
    assert top1 == {"ok": True, "outputs": decode(oracle(prompt, 16))}


MULTIBYTE_PROMPTS = ["🌊", "你好", "こんにちは世界", "AI: ☀️🌊🏖️", "水星、金星、地球", "谢谢"]


def _splits_a_character(tokenizer, ids: list[int]) -> bool:
    """True if some token of ``ids`` alone is not valid UTF-8 but the whole decodes to non-ASCII text."""
    partial = any("\ufffd" in tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids)
    text = tokenizer.decode(ids, clean_up_tokenization_spaces=False).replace("\ufffd", "")
    return partial and any(ord(ch) > 127 for ch in text)


def test_multibyte_text_one_token_per_call_equals_one_call(api, oracle, decode, decode_partial, tokenizer):
    cases = [(p, oracle(p, 24)) for p in MULTIBYTE_PROMPTS]
    cases = [(p, ids) for p, ids in cases if _splits_a_character(tokenizer, ids)]
    assert cases, "no prompt produced a character split over several tokens: the test would prove nothing"
    for prompt, ids in cases:
        session_id = api.open_session(max_length=64)
        text = api.generate(inputs=prompt, max_new_tokens=1, session_id=session_id)["outputs"]
        for _ in range(len(ids) - 1):
            text += api.generate(max_new_tokens=1, session_id=session_id)["outputs"]
        api.close_session(session_id)
        one_call = api.generate(inputs=prompt, max_new_tokens=len(ids))["outputs"]
        assert one_call == decode(ids)
        assert text == decode_partial(ids)


def test_pad_token_in_the_inputs_is_attended_like_any_token(api, tokenizer):
    """The pad token (typed as text here; a model may also generate it) is no mask: left to
    transformers it got a 0 in the attention mask, which the Petals client refused (a 502)."""
    prompt = f"Human: what does {tokenizer.pad_token} mean?\n\nAI:"
    assert tokenizer.pad_token_id in tokenizer(prompt, add_special_tokens=False).input_ids
    one_call = api.generate(inputs=prompt, max_new_tokens=8)
    session_id = api.open_session(max_length=64)
    pieces = [api.generate(inputs=prompt, max_new_tokens=1, session_id=session_id)]
    pieces += [api.generate(max_new_tokens=1, session_id=session_id) for _ in range(7)]  # the pad token is held
    api.close_session(session_id)
    assert one_call["ok"] and all(piece["ok"] for piece in pieces), (one_call, pieces)
    joined = "".join(piece["outputs"] for piece in pieces)
    assert one_call["outputs"] in (joined, joined + "\ufffd")  # the session holds an incomplete last character


def test_invalid_bytes_come_out_at_once_one_token_per_call(api, inference, oracle, decode):
    """Twenty tokens that are bytes of no character (a lone continuation byte, then lead bytes
    0xE8 that no continuation byte follows): one per call in a session, each call shows its
    U+FFFD, and so does each v2 ``token`` event. They used to be "" until the very end."""
    prompt, total = "world Petals", 20
    expected = decode(oracle(prompt, total))
    assert expected == "\ufffd" * total, "the prompt no longer produces invalid bytes: the test would prove nothing"
    session_id = api.open_session(max_length=64)
    pieces = [api.generate(inputs=prompt, max_new_tokens=1, session_id=session_id)["outputs"]]
    pieces += [api.generate(max_new_tokens=1, session_id=session_id)["outputs"] for _ in range(total - 1)]
    api.close_session(session_id)
    # Only a lead byte waits, one token: the next shows whether it began a character. The last one
    # stays held in the session (a next token may still complete it).
    assert pieces == ["\ufffd", ""] + ["\ufffd"] * (total - 2)
    body = {"inputs": prompt, "max_new_tokens": total}
    response = requests.post(f"{inference.base_url}/api/v2/generate_stream", json=body, stream=True, timeout=60)
    events = list(parse_sse(response.iter_content(chunk_size=None)))
    assert [data["text"] for event, data in events if event == "token"] == pieces
    assert events[-1][0] == "done" and events[-1][1]["outputs"] == expected  # the end releases the last byte
