"""``POST /v1/tokenize`` and ``POST /v1/detokenize``: the model's tokenizer, in vLLM's shapes, for
clients that count tokens. A replica of the named model (or the default one) answers
(services/inference/tokenizer_api.py); ``messages`` (instead of ``prompt``) are rendered as the
chat endpoint renders them, assistant turn open, and tokenized without added special tokens.
"""

from __future__ import annotations

import json
from typing import Any

import falcon
import falcon.asgi

from services.common.api.params import read_values_async
from services.common.api.replica_request import DETOKENIZE_PATH, TOKENIZE_PATH
from services.common.web.errors import InvalidParameter
from services.gateway.openai_params import check_prompt_length, parse_chat
from services.gateway.openai_tools import chat_prompt
from services.gateway.relay import Request, read_answer, upstream_error
from services.gateway.replicas import Decision
from services.gateway.routing import RoutedResource


class _TokenizerResource(RoutedResource):
    error_envelope = "openai"
    path = ""

    async def on_post(self, req: Request, resp: falcon.asgi.Response) -> None:
        body = await read_values_async(req, self._limits)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise InvalidParameter("model must be a string: one of the names GET /v1/models lists", param="model")
        name = self._router.replicas.resolve(model or None).name
        request = {**self._request(body, name), "model": name}
        upstream = await self._router.to_model(name, Decision.SESSIONLESS, "POST", self.path, json_body=request)
        answer = await read_answer(upstream)
        if answer.status != 200:
            raise upstream_error(answer)
        resp.media = json.loads(answer.data)

    def _request(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        """What the replica is sent (its model added)."""
        return body


class TokenizeResource(_TokenizerResource):
    """``POST /v1/tokenize``: ``{"model"?, "prompt", "add_special_tokens"?}`` or ``{"model"?, "messages"}``
    -> ``{"count", "max_model_len", "tokens"}``."""

    path = TOKENIZE_PATH

    def _request(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        if "messages" not in body:
            return {"prompt": body.get("prompt"), "add_special_tokens": body.get("add_special_tokens", True)}
        messages, options = parse_chat({"messages": body["messages"], "model": model}, self._limits)
        prompt = chat_prompt(self._router.replicas.resolve(model), messages, options.tools)
        check_prompt_length(prompt, self._limits)
        return {"prompt": prompt, "add_special_tokens": False}


class DetokenizeResource(_TokenizerResource):
    """``POST /v1/detokenize``: ``{"model"?, "tokens"}`` -> ``{"prompt"}``."""

    path = DETOKENIZE_PATH

    def _request(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        return {"tokens": body.get("tokens")}
