"""OpenAI's ``logprobs`` objects, from the entries a replica sends per token.

A replica's entry is already chat's shape (``{"token", "logprob", "bytes", "top_logprobs"}``,
services/inference/scores.py). Chat answers carry them as ``{"content": [...], "refusal": null}``;
completions carry OpenAI's legacy columns: ``tokens``, ``token_logprobs``, ``top_logprobs`` (per
token, the k alternatives and the chosen token, keyed by text, as vLLM gives them) and
``text_offset`` (each token's character offset in the choice's text, the echoed prompt included).
"""

from __future__ import annotations

from typing import Any

Entry = dict[str, Any]


def chat_logprobs(entries: list[Entry]) -> dict[str, Any]:
    """Chat's ``logprobs`` of a choice or a chunk."""
    return {"content": entries, "refusal": None}


class CompletionLogprobs:
    """Completions' ``logprobs`` columns of one choice, block by block (a stream's chunks), with the
    text offsets running on."""

    def __init__(self) -> None:
        self._offset = 0

    def block(self, entries: list[Entry]) -> dict[str, list[Any]]:
        """The columns of the next ``entries``."""
        columns: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry in entries:
            columns["tokens"].append(entry["token"])
            columns["token_logprobs"].append(entry["logprob"])
            columns["top_logprobs"].append(_alternatives(entry))
            columns["text_offset"].append(self._offset)
            self._offset += len(entry["token"])
        return columns


def _alternatives(entry: Entry) -> dict[str, float] | None:
    if entry["top_logprobs"] is None:  # a prompt's first token: nothing scored it
        return None
    alternatives = {alternative["token"]: alternative["logprob"] for alternative in entry["top_logprobs"]}
    return {**alternatives, entry["token"]: entry["logprob"]}
