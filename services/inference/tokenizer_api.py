"""The replica's tokenizer endpoints, in vLLM's shapes (the gateway serves them as ``/v1/tokenize``
and ``/v1/detokenize``, services/gateway/tokenizer_api.py):

- ``POST /internal/tokenize`` ``{"model"?, "prompt", "add_special_tokens"?: true}`` ->
  ``{"count", "max_model_len", "tokens"}``;
- ``POST /internal/detokenize`` ``{"model"?, "tokens": [ids]}`` -> ``{"prompt"}`` (special tokens kept).
"""

from __future__ import annotations

from typing import Any

import falcon

from services.common.api.params import Limits, get_bool, get_model, get_str, read_values
from services.common.web.errors import InvalidParameter, PayloadTooLarge
from services.inference.model import ModelHandle


class _TokenizerResource:
    def __init__(self, model: ModelHandle, limits: Limits) -> None:
        self._model = model
        self._limits = limits

    def _values(self, req: falcon.Request) -> dict[str, Any]:
        values = read_values(req, self._limits)
        self._model.require_model(get_model(values))
        self._model.require_ready()
        return values


class TokenizeResource(_TokenizerResource):
    """``POST /internal/tokenize``: a prompt's token ids."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        values = self._values(req)
        prompt = get_str(values, "prompt", max_chars=self._limits.max_input_chars)
        if prompt is None:
            raise InvalidParameter("prompt is required: the text to tokenize", param="prompt")
        special = get_bool(values, "add_special_tokens", default=True)
        tokens = self._model.tokenizer(prompt, add_special_tokens=special)["input_ids"]
        resp.media = {"count": len(tokens), "max_model_len": self._model.max_length, "tokens": tokens}


class DetokenizeResource(_TokenizerResource):
    """``POST /internal/detokenize``: the text of token ids."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        tokens = _token_ids(self._values(req).get("tokens"), self._limits.max_input_chars)
        self._model.require_token_ids(tokens, "tokens")
        text = self._model.tokenizer.decode(tokens, clean_up_tokenization_spaces=False)
        resp.media = {"prompt": text}


def _token_ids(value: Any, limit: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise InvalidParameter("tokens must be a list of token ids", param="tokens")
    if len(value) > limit:
        raise PayloadTooLarge(f"tokens has {len(value)} ids; the limit is {limit}", param="tokens")
    return value
