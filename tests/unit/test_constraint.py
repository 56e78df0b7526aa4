"""Constrained decoding in process: whatever the scores, greedy picks under the grammar give valid JSON."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from services.common.api.grammar import json_schema_grammar
from services.inference.constraint import GrammarConstraint, GrammarTokenizer
from services.swarm.tiny_bloom import ensure_tiny_bloom

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}, "tag": {"enum": ["a", "b"]}},
    "required": ["n", "tag"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_tiny_bloom())


@pytest.mark.parametrize("seed", range(3))
def test_random_scores_still_give_a_valid_document(tokenizer, seed):
    vocabulary = len(tokenizer) + 7  # logits wider than the tokenizer, as padded heads are
    constraint = GrammarConstraint(GrammarTokenizer(tokenizer, vocabulary), json_schema_grammar(SCHEMA, "s"))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([tokenizer("Some prompt", add_special_tokens=False).input_ids])
    prompt_length = ids.shape[-1]
    for _ in range(64):
        scores = constraint(ids, torch.randn(1, vocabulary, generator=generator))
        token = int(scores.argmax(-1))
        ids = torch.cat([ids, torch.tensor([[token]])], dim=-1)
        if token == tokenizer.eos_token_id:
            break
    assert token == tokenizer.eos_token_id
    jsonschema.validate(json.loads(tokenizer.decode(ids[0, prompt_length:-1])), SCHEMA)
