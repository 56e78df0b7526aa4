"""Constrained-decoding libraries compared: per-token mask cost on both vocabularies, schema coverage.

For each library that imports here (llguidance, xgrammar, outlines-core, lm-format-enforcer), on
the SmolLM2 tokenizer (49,152 tokens) and the tiny BLOOM's (250,880): the time to build the
tokenizer's index once, to compile a schema, and per token the time to compute the allowed set
and apply it to a float32 logits row, while replaying a valid answer's tokens (median of the
steps). Then coverage: which of a list of JSON Schema features each compiles. Prints a table;
asserts nothing. Run: ``.venv/bin/python -m bench.grammar_libraries`` (``--libraries`` to pick;
libraries missing from the environment are skipped, e.g. put them on PYTHONPATH from a folder).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "tags": ["a", "c"], "address": {"city": "London", "zip": "W1"}}
FEATURES: dict[str, dict[str, Any]] = {
    "nested objects": SCHEMA,
    "enum, const": {"type": "object", "properties": {"a": {"enum": [1, "x", None]}, "b": {"const": "k"}}},
    "number bounds": {"type": "number", "minimum": -1.5, "exclusiveMaximum": 10},
    "integer bounds": {"type": "integer", "minimum": 3, "maximum": 12},
    "string length": {"type": "string", "minLength": 2, "maxLength": 8},
    "pattern": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]+$"},
    "format date-time": {"type": "string", "format": "date-time"},
    "array bounds": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "anyOf": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "oneOf": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    "type list (nullable)": {"type": ["string", "null"]},
    "$defs and $ref": {
        "$defs": {"p": {"type": "integer"}},
        "type": "object",
        "properties": {"x": {"$ref": "#/$defs/p"}},
    },
    "recursive $ref": {
        "$defs": {"n": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}},
        "$ref": "#/$defs/n",
    },
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]},
    "tuple (prefixItems)": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]},
}


def _tokenizers() -> dict[str, Any]:
    from transformers import AutoTokenizer

    from services.swarm import smollm2, tiny_bloom

    smol = AutoTokenizer.from_pretrained(smollm2.ensure_smollm2())
    return {
        "SmolLM2 (49,152)": smol,
        "BLOOM-size (250,880)": _bloom_sized(smol),
        "tiny BLOOM (600)": AutoTokenizer.from_pretrained(tiny_bloom.ensure_tiny_bloom()),
    }


def _bloom_sized(smol: Any) -> Any:
    """A byte-level BPE tokenizer with BLOOM's 250,880 tokens (the tiny BLOOM's is trained to 600):
    SmolLM2's vocabulary and merges, plus merges of pairs of its tokens up to that size, in a fixed order."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    state = json.loads(smol.backend_tokenizer.to_str())
    vocab: dict[str, int] = dict(state["model"]["vocab"])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]
    tokens = [t for t in vocab if not t.startswith("<|")]
    rng = random.Random(0)
    while len(vocab) < BLOOM_VOCABULARY:
        left, right = rng.choice(tokens), rng.choice(tokens)
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
            merges.append((left, right))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [t for t in vocab if t.startswith("<|")]
    tokenizer.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>")


def _vocab_size(tokenizer: Any) -> int:
    return max(len(tokenizer), tokenizer.vocab_size)


class Candidate:
    """One library: ``prepare`` a tokenizer once, ``compile`` a schema, then ``step`` per token."""

    name = ""

    def prepare(self, tokenizer: Any) -> None:
        raise NotImplementedError

    def compile(self, schema: dict[str, Any]) -> Any:
        raise NotImplementedError

    def run(self, compiled: Any, tokens: list[int], vocab: int) -> list[float]:
        """Per token: seconds to compute the mask and apply it to a logits row; then advance."""
        raise NotImplementedError


class LLGuidance(Candidate):
    name = "llguidance"

    def prepare(self, tokenizer: Any) -> None:
        import llguidance.hf

        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer)

    def compile(self, schema: dict[str, Any]) -> Any:
        from llguidance import LLMatcher

        grammar = LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        error = LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error:
            raise ValueError(error)
        return grammar

    def run(self, compiled: Any, tokens: list[int], vocab: int) -> list[float]:
        import numpy as np
        from llguidance import LLMatcher

        matcher = LLMatcher(self._tokenizer, compiled)
        words = (vocab + 31) // 32
        bits = np.zeros(words, dtype=np.int32)
        times = []
        for token in tokens:
            logits = torch.randn(1, vocab)
            start = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            allowed = np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab]
            logits.masked_fill_(torch.from_numpy(allowed == 0).unsqueeze(0), float("-inf"))
            times.append(time.perf_counter() - start)
            assert allowed[token], "the answer's token must be allowed"
            matcher.consume_token(token)
        return times


class XGrammar(Candidate):
    name = "xgrammar"

    def prepare(self, tokenizer: Any) -> None:
        import xgrammar

        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=_vocab_size(tokenizer))
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def run(self, compiled: Any, tokens: list[int], vocab: int) -> list[float]:
        import xgrammar

        matcher = xgrammar.GrammarMatcher(compiled)
        bitmask = xgrammar.allocate_token_bitmask(1, vocab)
        times = []
        for token in tokens:
            logits = torch.randn(1, vocab)
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            xgrammar.apply_token_bitmask_inplace(logits, bitmask)
            times.append(time.perf_counter() - start)
            assert logits[0, token] > float("-inf"), "the answer's token must be allowed"
            matcher.accept_token(token)
        return times


class OutlinesCore(Candidate):
    name = "outlines-core"

    def prepare(self, tokenizer: Any) -> None:
        from outlines_core import Vocabulary

        from services.inference.decoding import TokenBytes

        token_bytes = TokenBytes(tokenizer)
        by_bytes: dict[bytes, list[int]] = {}
        for token_id in range(len(tokenizer)):
            data = token_bytes[token_id]
            if data and token_id != tokenizer.eos_token_id:
                by_bytes.setdefault(data, []).append(token_id)
        self._vocabulary = Vocabulary(tokenizer.eos_token_id, by_bytes)

    def compile(self, schema: dict[str, Any]) -> Any:
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        return Index(build_regex_from_schema(json.dumps(schema)), self._vocabulary)

    def run(self, compiled: Any, tokens: list[int], vocab: int) -> list[float]:
        from outlines_core import Guide

        guide = Guide(compiled)
        times = []
        for token in tokens:
            logits = torch.randn(1, vocab)
            start = time.perf_counter()
            allowed = torch.tensor(guide.get_tokens(), dtype=torch.long)
            masked = torch.full_like(logits, float("-inf"))
            masked[0, allowed] = logits[0, allowed]
            times.append(time.perf_counter() - start)
            if not guide.is_finished():
                guide.advance(token)
        return times


class FormatEnforcer(Candidate):
    name = "lm-format-enforcer"

    def prepare(self, tokenizer: Any) -> None:
        from lmformatenforcer.integrations.transformers import build_token_enforcer_tokenizer_data

        self._data = build_token_enforcer_tokenizer_data(tokenizer)

    def compile(self, schema: dict[str, Any]) -> Any:
        from lmformatenforcer import JsonSchemaParser

        return JsonSchemaParser(schema)

    def run(self, compiled: Any, tokens: list[int], vocab: int) -> list[float]:
        import numpy as np
        from lmformatenforcer import TokenEnforcer

        enforcer = TokenEnforcer(self._data, compiled)
        times, prefix = [], [0]
        for token in tokens:
            logits = torch.randn(1, vocab)
            start = time.perf_counter()
            allowed = enforcer.get_allowed_tokens(prefix)
            if allowed.use_bitmask:
                bits = allowed.allowed_tokens.numpy().view(np.uint8)
                forbidden = torch.from_numpy(np.unpackbits(bits, bitorder="little")[:vocab] == 0)
                logits.masked_fill_(forbidden.unsqueeze(0), float("-inf"))
            else:
                ids = torch.tensor(allowed.allowed_tokens, dtype=torch.long)
                masked = torch.full_like(logits, float("-inf"))
                masked[0, ids] = logits[0, ids]
            times.append(time.perf_counter() - start)
            prefix.append(token)
        return times


BLOOM_VOCABULARY = 250_880
CANDIDATES: dict[str, Callable[[], Candidate]] = {
    c.name: c for c in (LLGuidance, XGrammar, OutlinesCore, FormatEnforcer)
}


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def _coverage(candidate: Candidate) -> list[str]:
    supported = []
    for feature, schema in FEATURES.items():
        try:
            candidate.compile(schema)
        except Exception:  # any failure is "not supported"
            continue
        supported.append(feature)
    return supported


def _measure(name: str, tokenizers: dict[str, Any]) -> None:
    answer = json.dumps(ANSWER, separators=(",", ":"))
    for vocabulary, tokenizer in tokenizers.items():
        candidate = CANDIDATES[name]()
        try:
            _, prepare_s = _timed(lambda: candidate.prepare(tokenizer))  # noqa: B023
            compiled, compile_s = _timed(lambda: candidate.compile(SCHEMA))  # noqa: B023
            tokens = [*tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]
            times = candidate.run(compiled, tokens, _vocab_size(tokenizer))
        except Exception as error:  # report it and go on with the next
            print(f"{name:20} {vocabulary:22} failed: {type(error).__name__}: {str(error)[:120]}")
            continue
        print(
            f"{name:20} {vocabulary:22} tokenizer {prepare_s:7.2f} s  compile {compile_s * 1e3:8.1f} ms  "
            f"per token median {statistics.median(times) * 1e6:8.0f} us  max {max(times) * 1e6:8.0f} us "
            f"({len(times)} tokens)"
        )
        if vocabulary.startswith("SmolLM2"):
            supported = _coverage(candidate)
            missing = sorted(set(FEATURES) - set(supported))
            print(f"{'':20} coverage {len(supported)}/{len(FEATURES)}; missing: {', '.join(missing) or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libraries", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizers = _tokenizers()
    for name in args.libraries:
        _measure(name, tokenizers)


if __name__ == "__main__":
    main()
