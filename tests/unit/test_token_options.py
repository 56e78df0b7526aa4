"""The OpenAI API's per-token options: their JSON round trip, the penalties and bias as logits
processors, the score reader, and the gateway's logprobs shapes (no services needed)."""

from __future__ import annotations

import pytest
import torch

from services.common.api.token_options import TokenOptions
from services.common.web.errors import InvalidParameter
from services.gateway.openai_scores import CompletionLogprobs, chat_logprobs
from services.inference.scores import IMPOSSIBLE, ScoreReader, prompt_entries
from services.inference.shaping import CompletionPenalty, LogitBias


class Names:
    """Token i is the letter chr(97 + i)."""

    def describe(self, token_id: int, logprob: float | None) -> dict:
        score = logprob if logprob is None or logprob > IMPOSSIBLE else IMPOSSIBLE
        return {"token": chr(97 + token_id), "logprob": score, "bytes": [97 + token_id]}


def test_options_round_trip_through_json():
    options = TokenOptions(logprobs=3, prompt_logprobs=True, presence_penalty=-1.5, frequency_penalty=2.0,
                           logit_bias=((4, -100.0), (9, 2.5)))  # fmt: skip
    assert TokenOptions.from_json(options.to_json()) == options
    assert TokenOptions().to_json() == {} and TokenOptions.from_json({}) == TokenOptions()


def test_a_replica_checks_the_ranges_again():
    for bad in ({"logprobs": 21}, {"presence_penalty": 2.1}, {"logit_bias": {"1": 100.5}}, {"logit_bias": {"a": 1}}):
        with pytest.raises(InvalidParameter):
            TokenOptions.from_json(bad)


def test_penalties_count_only_the_generated_tokens_as_openai_defines_them():
    input_ids = torch.tensor([[1, 2, 2, 2, 3]])  # the first two held before: 2 generated twice, 3 once
    scores = CompletionPenalty(presence=0.5, frequency=0.25, start=2)(input_ids, torch.zeros(1, 5))
    assert scores.tolist() == [[0.0, 0.0, -1.0, -0.75, 0.0]]
    untouched = torch.arange(5.0).unsqueeze(0)
    assert torch.equal(CompletionPenalty(1.0, 1.0, start=5)(input_ids, untouched), untouched)


def test_logit_bias_adds_to_the_named_tokens_only():
    scores = torch.zeros(1, 4)
    assert LogitBias(((0, -100.0), (3, 2.5)))(None, scores).tolist() == [[-100.0, 0.0, 0.0, 2.5]]
    assert scores.tolist() == [[0.0] * 4]  # not in place


def test_the_reader_keeps_the_log_softmax_and_describes_the_chosen_token():
    reader = ScoreReader(Names(), top=2)
    scores = torch.tensor([[1.0, 3.0, 2.0, float("-inf")]])
    assert reader(None, scores) is scores
    expected = torch.log_softmax(scores, dim=-1)[0]
    entry = reader.entry(2)
    assert entry["token"] == "c" and entry["bytes"] == [99] and entry["logprob"] == pytest.approx(float(expected[2]))
    assert [alternative["token"] for alternative in entry["top_logprobs"]] == ["b", "c"]
    assert reader.entry(3)["logprob"] == IMPOSSIBLE  # JSON has no -inf
    assert ScoreReader(Names(), top=0)(None, scores) is scores


def test_a_prompts_first_token_is_unscored():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    entries = prompt_entries(Names(), [logits[:1], logits[1:]], [0, 2, 0], top=1)  # in chunks
    assert prompt_entries(Names(), [logits], [0, 2, 0], top=1) == entries
    assert entries[0] == {"token": "a", "logprob": None, "bytes": [97], "top_logprobs": None}
    assert entries[1]["logprob"] == pytest.approx(float(torch.log_softmax(logits[0], -1)[2]))
    assert entries[2]["top_logprobs"][0]["token"] == "a"


def test_completion_columns_run_their_offsets_on():
    first = {"token": "ab", "logprob": None, "bytes": [97, 98], "top_logprobs": None}
    second = {"token": "c", "logprob": -0.5, "bytes": [99],
              "top_logprobs": [{"token": "d", "logprob": -1.0, "bytes": [100]}]}  # fmt: skip
    columns = CompletionLogprobs()
    assert columns.block([first]) == {"tokens": ["ab"], "token_logprobs": [None], "top_logprobs": [None],
                                      "text_offset": [0]}  # fmt: skip
    assert columns.block([second]) == {"tokens": ["c"], "token_logprobs": [-0.5],
                                       "top_logprobs": [{"d": -1.0, "c": -0.5}], "text_offset": [2]}  # fmt: skip
    assert chat_logprobs([second]) == {"content": [second], "refusal": None}
