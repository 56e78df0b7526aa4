"""The OpenAI-compatible API: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``.

Each request becomes one call to a replica's ``/api/v2/generate_stream``; its events are
relayed as OpenAI's stream chunks (ending with ``data: [DONE]``) or gathered into one answer.
``temperature`` 0 means greedy decoding. Every request goes to a replica of the model it names;
chat messages are rendered in that model's chat format (its card's, see services/common/chat/formats.py).
Chat requests are conversation requests: the replica continues the session that holds the
conversation so far, when one does and it is the same client's (see services/inference/sessions.py),
and the conversation is routed by its opening messages so that follow-ups reach that replica.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from typing import Any

import falcon
import falcon.asgi

from services.common.api.params import TEMPERATURE as SAMPLING_TEMPERATURE
from services.common.api.params import GenerateParams, read_values_async
from services.common.api.replica_request import GENERATE_STREAM_PATH, ReplicaRequest
from services.common.chat.model_card import ModelCard
from services.common.chat.template import ChatTemplate, compiled
from services.common.web.errors import ApiError, ServiceUnavailable, openai_error_body
from services.common.web.sse import SSE_CONTENT_TYPE, SSE_HEADERS, parse_sse_async
from services.gateway.openai_params import SamplingOptions, check_prompt_length, parse_chat, parse_completion
from services.gateway.openai_tools import Arguments, CallOpened, Content, ToolCallParser, ToolChoice, prompt_messages
from services.gateway.relay import ClientStream, Request, read_answer, relayed_chunks, upstream_error
from services.gateway.replicas import Decision
from services.gateway.routing import RoutedResource, Router
from services.gateway.upstream import ReplicaUnreachable, Stream

_FINISH_REASONS = {"stop": "stop", "eos": "stop", "length": "length"}
_STREAM_ERROR_STATUS = {"unavailable": falcon.HTTP_503, "internal_error": falcon.HTTP_500}
Events = AsyncGenerator[tuple[str, dict[str, Any]], None]  # a replica's SSE events; aclose() drops the stream


class ModelsResource:
    """``GET /v1/models``: every model the inference replicas serve, with its card (the default one first)."""

    error_envelope = "openai"

    def __init__(self, router: Router) -> None:
        self._router = router
        self._created = int(time.time())

    async def on_get(self, req: Request, resp: falcon.asgi.Response) -> None:
        replicas = self._router.replicas
        default = replicas.default_model()
        cards = sorted(replicas.cards(), key=lambda card: card.name != default)
        resp.media = {"object": "list", "data": [self._entry(card, card.name == default) for card in cards]}

    def _entry(self, card: ModelCard, default: bool) -> dict[str, Any]:
        """OpenAI's model object, plus the card (clients ignore fields they do not know)."""
        entry = {"id": card.name, "object": "model", "created": self._created, "owned_by": "petals"}
        card_json = card.public_json()
        del card_json["name"]  # it is the id
        return {**entry, "default": default, **card_json}


class CompletionsResource(RoutedResource):
    """``POST /v1/completions``: text completion of a prompt."""

    error_envelope = "openai"

    async def on_post(self, req: Request, resp: falcon.asgi.Response) -> None:
        prompt, options = parse_completion(await read_values_async(req, self._limits), self._limits)
        generation = await _start(self._router, prompt, options, conversation_key=None, client=req.context.client.name)
        await _answer(req, resp, _CompletionShape(options), generation)


class ChatCompletionsResource(RoutedResource):
    """``POST /v1/chat/completions``: the next assistant message of a conversation."""

    error_envelope = "openai"

    async def on_post(self, req: Request, resp: falcon.asgi.Response) -> None:
        body = await read_values_async(req, self._limits)
        messages, options = parse_chat(body, self._limits)
        card = self._router.replicas.resolve(options.model)
        prompt = _chat_prompt(compiled(card.chat_template), card, messages, options.tools)
        check_prompt_length(prompt, self._limits)
        if "stop" not in body:
            options = replace(options, stop=card.chat.stop)
        key, client = _opening(messages), req.context.client.name  # a new conversation session counts toward its quota
        generation = await _start(self._router, prompt, options, conversation_key=key, client=client)
        await _answer(req, resp, _ChatShape(options), generation)


def _chat_prompt(
    template: ChatTemplate, card: ModelCard, messages: list[dict[str, Any]], tools: ToolChoice | None
) -> str:
    """The prompt in the model's own format; tools and calls in the template's way, if it has one,
    else in the documented one (services/gateway/openai_tools.py)."""
    if template.takes_tools:
        offered = [tool.to_json() for tool in tools.tools] if tools else None
        return template.render(messages, card.chat, tools=offered)
    return template.render(prompt_messages(messages, tools), card.chat)


def _opening(messages: list[dict[str, Any]]) -> str:
    """The conversation's routing key: its messages up to the first user message."""
    end = next((index for index, message in enumerate(messages) if message["role"] == "user"), len(messages) - 1)
    return hashlib.sha256(json.dumps(messages[: end + 1]).encode()).hexdigest()


async def _start(
    router: Router, prompt: str, options: SamplingOptions, conversation_key: str | None, client: str | None = None
) -> Events:
    """Send the generation to a replica of its model; the replica's events (errors before any are raised)."""
    model = router.replicas.resolve(options.model).name
    body = _replica_request(prompt, options, conversation=conversation_key is not None, client=client).to_json()
    if conversation_key is None:
        upstream = await router.to_model(model, Decision.SESSIONLESS, "POST", GENERATE_STREAM_PATH, json_body=body)
    else:
        upstream = await router.to_conversation(conversation_key, model, "POST", GENERATE_STREAM_PATH, json_body=body)
    if upstream.status != 200:
        raise upstream_error(await read_answer(upstream))
    return _events(upstream)


async def _events(upstream: Stream) -> Events:
    chunks = relayed_chunks(upstream)
    try:
        async for event in parse_sse_async(chunks):
            yield event
    finally:
        await chunks.aclose()  # closing early drops the connection: the replica stops generating


def _replica_request(
    prompt: str, options: SamplingOptions, *, conversation: bool, client: str | None = None
) -> ReplicaRequest:
    sampling = options.temperature >= SAMPLING_TEMPERATURE.minimum  # 0 (or below v1's floor): greedy
    params = GenerateParams(
        inputs=prompt,
        do_sample=sampling,
        temperature=options.temperature if sampling else None,
        top_k=None,
        top_p=options.top_p if sampling else None,
        max_length=None,
        max_new_tokens=options.max_tokens,
        session_id=None,
        stop=options.stop,
        seed=options.seed if sampling else None,
        model=options.model,
        repetition_penalty=options.repetition_penalty,
        grammar=options.grammar,
    )
    fill_context = options.max_tokens is None
    return ReplicaRequest(params, conversation=conversation, fill_context=fill_context, client=client)


class _Shape(ABC):
    """What differs between completion and chat answers: ids, object names and choices."""

    id_prefix = ""
    object_name = ""
    chunk_object_name = ""

    def __init__(self, options: SamplingOptions) -> None:
        self.options = options
        self.id = self.id_prefix + secrets.token_urlsafe(18)
        self.created = int(time.time())

    def envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.options.model,
            "choices": choices,
        }

    @abstractmethod
    def choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        """The one choice of a whole answer."""

    @abstractmethod
    def delta(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        """The one choice of a stream chunk (``text`` None: the last chunk)."""

    def opening_delta(self) -> dict[str, Any] | None:
        return None

    def deltas(self, text: str) -> list[dict[str, Any]]:
        """The stream chunks' choices for one token's text."""
        return [self.delta(text, None)]

    def finish_reason(self, reason: str) -> str:
        """OpenAI's finish reason of the answer, given the replica's (mapped)."""
        return reason


class _CompletionShape(_Shape):
    id_prefix = "cmpl-"
    object_name = chunk_object_name = "text_completion"

    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def delta(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        return self.choice(text or "", finish_reason)


class _ChatShape(_Shape):
    id_prefix = "chatcmpl-"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, options: SamplingOptions) -> None:
        super().__init__(options)
        self._calls = ToolCallParser() if options.tools else None

    def choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self._calls is not None:
            content, calls = _gathered(self._calls.push(text))
            message = {"role": "assistant", "content": content or None, **({"tool_calls": calls} if calls else {})}
            finish_reason = self.finish_reason(finish_reason)
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}

    def delta(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        delta = {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def deltas(self, text: str) -> list[dict[str, Any]]:
        if self._calls is None:
            return super().deltas(text)
        return [_delta_of(event) for event in self._calls.push(text)]

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self._calls is not None and self._calls.calls and reason == "stop" else reason

    def opening_delta(self) -> dict[str, Any] | None:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def _gathered(events: Any) -> tuple[str, list[dict[str, Any]]]:
    """A whole answer's text and calls (OpenAI's message ``tool_calls``)."""
    content, calls = "", []
    for event in events:
        if isinstance(event, Content):
            content += event.text
        elif isinstance(event, CallOpened):
            calls.append({"id": event.id, "type": "function", "function": {"name": event.name, "arguments": ""}})
        else:
            calls[event.index]["function"]["arguments"] += event.text
    return content, calls


def _delta_of(event: Content | CallOpened | Arguments) -> dict[str, Any]:
    """One stream chunk's choice: text, a call's opening (id, name) or a piece of its arguments."""
    if isinstance(event, Content):
        delta: dict[str, Any] = {"content": event.text}
    elif isinstance(event, CallOpened):
        function = {"name": event.name, "arguments": ""}
        delta = {"tool_calls": [{"index": event.index, "id": event.id, "type": "function", "function": function}]}
    else:
        delta = {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}


async def _answer(req: Request, resp: falcon.asgi.Response, shape: _Shape, events: Events) -> None:
    if shape.options.stream:
        resp.content_type = SSE_CONTENT_TYPE
        resp.set_headers(SSE_HEADERS)
        resp.stream = ClientStream(req, _stream_chunks(shape, events))
        return
    done = None
    try:
        async for event, data in _checked(events):
            if event == "done":
                done = data
                break
    finally:
        await events.aclose()
    if done is None:
        raise ServiceUnavailable("The inference replica ended the answer early; retry")
    answer = shape.envelope(shape.object_name, [shape.choice(done["outputs"], _finish_reason(done))])
    resp.media = {**answer, "usage": _usage(done)}


async def _checked(events: Events) -> Events:
    """The replica's events; its error event, or its breaking off, raised as an ApiError."""
    try:
        async for event, data in events:
            if event == "error":
                error = data.get("error", {})
                code = str(error.get("code", "upstream_error"))
                status = _STREAM_ERROR_STATUS.get(code, falcon.HTTP_502)
                raise ApiError(str(error.get("message", "Generation failed")), status=status, code=code)
            yield event, data
    except ReplicaUnreachable as error:
        raise ApiError("The inference replica stopped answering; retry", status=falcon.HTTP_502) from error


async def _stream_chunks(shape: _Shape, events: Events) -> AsyncIterator[bytes]:
    """OpenAI's stream: a chunk per token, a last one with the finish reason, usage, [DONE]."""
    extra = {"usage": None} if shape.options.include_usage else {}
    opening = shape.opening_delta()
    try:
        if opening is not None:
            yield _chunk({**shape.envelope(shape.chunk_object_name, [opening]), **extra})
        async for event, data in _checked(events):
            if event == "token" and data["text"]:
                for delta in shape.deltas(data["text"]):
                    yield _chunk({**shape.envelope(shape.chunk_object_name, [delta]), **extra})
            elif event == "done":
                last = shape.delta(None, shape.finish_reason(_finish_reason(data)))
                yield _chunk({**shape.envelope(shape.chunk_object_name, [last]), **extra})
                if shape.options.include_usage:
                    yield _chunk({**shape.envelope(shape.chunk_object_name, []), "usage": _usage(data)})
        yield b"data: [DONE]\n\n"
    except ApiError as error:
        yield _chunk({"error": openai_error_body(error)})
    finally:
        await events.aclose()  # a client that went away stops the generation


def _chunk(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def _finish_reason(done: dict[str, Any]) -> str:
    return _FINISH_REASONS.get(done.get("finish_reason", ""), "stop")


def _usage(done: dict[str, Any]) -> dict[str, Any]:
    cached = int(done.get("cached_tokens", 0))
    prompt = int(done["prompt_tokens"]) + cached
    completion = int(done["generated_tokens"])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
