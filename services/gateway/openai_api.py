"""The OpenAI-compatible API: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``.

Each request becomes one call to a replica's ``/api/v2/generate_stream``; its events are
relayed as OpenAI's stream chunks (ending with ``data: [DONE]``) or gathered into one answer.
``temperature`` 0 means greedy decoding. Every request goes to a replica of the model it names;
chat messages are rendered in that model's chat format (its card's, see services/common/chat/formats.py).
Chat requests are conversation requests: the replica continues the session that holds the
conversation so far, when one does and it is the same client's (see services/inference/sessions.py),
and the conversation is routed by its opening messages so that follow-ups reach that replica.

Several choices (``n``, ``best_of``) are that many generations without a session, started at once
(each may go to another replica of the model, and each counts toward its replica's
``MAX_SESSIONLESS_REQUESTS``); choice i samples with ``seed + i``, so each is reproducible. A chat
request with ``n`` > 1 does not continue or keep its conversation's session. ``best_of`` returns
the ``n`` choices of highest cumulative log-probability. Streamed choices interleave, by ``index``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass, field, replace
from typing import Any

import falcon
import falcon.asgi

from services.common.api.params import MAX_SEED, GenerateParams, Limits, read_values_async
from services.common.api.params import TEMPERATURE as SAMPLING_TEMPERATURE
from services.common.api.replica_request import GENERATE_STREAM_PATH, ReplicaRequest
from services.common.chat.model_card import ModelCard
from services.common.web.errors import ApiError, ServiceUnavailable, openai_error_body
from services.common.web.sse import SSE_CONTENT_TYPE, SSE_HEADERS, parse_sse_async
from services.gateway.openai_params import (
    DEFAULT_MAX_CHOICES,
    SamplingOptions,
    check_prompt_length,
    parse_chat,
    parse_completion,
)
from services.gateway.openai_scores import CompletionLogprobs, Entry, chat_logprobs
from services.gateway.openai_tools import Arguments, CallOpened, Content, ToolCallParser, chat_prompt
from services.gateway.relay import ClientStream, Request, read_answer, relayed_chunks, upstream_error
from services.gateway.replicas import Decision
from services.gateway.routing import RoutedResource, Router
from services.gateway.upstream import ReplicaUnreachable, Stream

_FINISH_REASONS = {"stop": "stop", "eos": "stop", "length": "length"}
_STREAM_ERROR_STATUS = {"unavailable": falcon.HTTP_503, "internal_error": falcon.HTTP_500}
Events = AsyncGenerator[tuple[str, dict[str, Any]], None]  # a replica's SSE events; aclose() drops the stream
ChoiceEvents = AsyncIterator[tuple[int, str, dict[str, Any]]]  # (choice index, event, data)


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


class _ChoicesResource(RoutedResource):
    """Base of the two completion resources: they take up to ``max_choices`` choices per request."""

    error_envelope = "openai"

    def __init__(self, router: Router, limits: Limits, max_choices: int = DEFAULT_MAX_CHOICES) -> None:
        super().__init__(router, limits)
        self._max_choices = max_choices


class CompletionsResource(_ChoicesResource):
    """``POST /v1/completions``: text completion of a prompt."""

    async def on_post(self, req: Request, resp: falcon.asgi.Response) -> None:
        body = await read_values_async(req, self._limits)
        prompt, options = parse_completion(body, self._limits, self._max_choices)
        streams = await _start_choices(self._router, prompt, options, None, req.context.client.name)
        await _answer(req, resp, _CompletionShape(options, prompt), streams)


class ChatCompletionsResource(_ChoicesResource):
    """``POST /v1/chat/completions``: the next assistant message of a conversation."""

    async def on_post(self, req: Request, resp: falcon.asgi.Response) -> None:
        body = await read_values_async(req, self._limits)
        messages, options = parse_chat(body, self._limits, self._max_choices)
        card = self._router.replicas.resolve(options.model)
        prompt = chat_prompt(card, messages, options.tools)
        check_prompt_length(prompt, self._limits)
        if "stop" not in body:
            options = replace(options, stop=card.chat.stop)
        key = _opening(messages) if options.n == 1 else None  # a new conversation session counts toward its quota
        streams = await _start_choices(self._router, prompt, options, key, req.context.client.name)
        await _answer(req, resp, _ChatShape(options), streams)


def _opening(messages: list[dict[str, str]]) -> str:
    """The conversation's routing key: its messages up to the first user message."""
    end = next((index for index, message in enumerate(messages) if message["role"] == "user"), len(messages) - 1)
    return hashlib.sha256(json.dumps(messages[: end + 1]).encode()).hexdigest()


async def _start_choices(
    router: Router, prompt: str, options: SamplingOptions, conversation_key: str | None, client: str | None
) -> list[Stream]:
    """Start every generation the request needs at once; if one fails to start, close the others and
    raise its error."""
    starts = [_start(router, prompt, options, conversation_key, client, index) for index in range(options.generations)]
    results = await asyncio.gather(*starts, return_exceptions=True)
    failures = [result for result in results if isinstance(result, BaseException)]
    if failures:
        for result in results:
            if isinstance(result, Stream):
                result.close()
        raise failures[0]
    return results  # type: ignore[return-value]


async def _start(
    router: Router,
    prompt: str,
    options: SamplingOptions,
    conversation_key: str | None,
    client: str | None,
    choice: int = 0,
) -> Stream:
    """Send one generation to a replica of its model; its stream (errors before any event are raised)."""
    model = router.replicas.resolve(options.model).name
    request = _replica_request(prompt, options, conversation_key=conversation_key, client=client, choice=choice)
    body = request.to_json()
    if conversation_key is None:
        upstream = await router.to_model(model, Decision.SESSIONLESS, "POST", GENERATE_STREAM_PATH, json_body=body)
    else:
        upstream = await router.to_conversation(conversation_key, model, "POST", GENERATE_STREAM_PATH, json_body=body)
    if upstream.status != 200:
        raise upstream_error(await read_answer(upstream))
    return upstream


async def _events(upstream: Stream) -> Events:
    chunks = relayed_chunks(upstream)
    try:
        async for event in parse_sse_async(chunks):
            yield event
    finally:
        await chunks.aclose()  # closing early drops the connection: the replica stops generating


def _replica_request(
    prompt: str, options: SamplingOptions, *, conversation_key: str | None, client: str | None = None, choice: int = 0
) -> ReplicaRequest:
    sampling = options.temperature >= SAMPLING_TEMPERATURE.minimum  # 0 (or below v1's floor): greedy
    seed = None if options.seed is None or not sampling else (options.seed + choice) % (MAX_SEED + 1)
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
        seed=seed,
        model=options.model,
        repetition_penalty=options.repetition_penalty,
        grammar=options.grammar,
    )
    token_options = options.token_options
    if options.best_of > options.n and token_options.logprobs is None:
        token_options = replace(token_options, logprobs=0)  # best_of ranks by the choices' scores
    fill_context = options.max_tokens is None
    return ReplicaRequest(
        params,
        conversation=conversation_key is not None,
        fill_context=fill_context,
        client=client,
        options=token_options,
        affinity=conversation_key,
    )


@dataclass
class _Choice:
    """What one generation returned: its last event, its tokens' entries, its prompt's (echo)."""

    done: dict[str, Any] | None = None
    entries: list[Entry] = field(default_factory=list)
    prompt_entries: list[Entry] | None = None

    @property
    def score(self) -> float:
        """Its cumulative log-probability (best_of's ranking)."""
        return float((self.done or {}).get("cumulative_logprob", float("-inf")))


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
    def choice(self, index: int, text: str, finish_reason: str, result: _Choice) -> dict[str, Any]:
        """One choice of a whole answer."""

    @abstractmethod
    def delta(self, index: int, text: str | None, finish_reason: str | None, entries: list[Entry]) -> dict[str, Any]:
        """One choice of a stream chunk (``text`` None: the last chunk)."""

    def opening_delta(self, index: int) -> dict[str, Any] | None:
        """The chunk a choice's stream opens with, before any event (None: none)."""
        return None

    def prompt_delta(self, index: int, entries: list[Entry] | None) -> dict[str, Any] | None:
        """The chunk of a choice's scored prompt (None: none)."""
        return None

    def deltas(self, index: int, text: str, entries: list[Entry]) -> list[dict[str, Any]]:
        """The stream chunks' choices for one token's text and scores."""
        return [self.delta(index, text, None, entries)]

    def finish_reason(self, reason: str) -> str:
        """OpenAI's finish reason of the answer, given the replica's (mapped)."""
        return reason


class _CompletionShape(_Shape):
    id_prefix = "cmpl-"
    object_name = chunk_object_name = "text_completion"

    def __init__(self, options: SamplingOptions, prompt: str) -> None:
        super().__init__(options)
        self._echo = prompt if options.echo else ""
        self._columns: dict[int, CompletionLogprobs] = {}

    def choice(self, index: int, text: str, finish_reason: str, result: _Choice) -> dict[str, Any]:
        entries = [*(result.prompt_entries or []), *result.entries]
        return self._choice(index, self._echo + text, finish_reason, entries)

    def delta(self, index: int, text: str | None, finish_reason: str | None, entries: list[Entry]) -> dict[str, Any]:
        return self._choice(index, text or "", finish_reason, entries)

    def opening_delta(self, index: int) -> dict[str, Any] | None:
        if not self._echo or self.options.token_options.prompt_logprobs:
            return None  # no echo, or the echo waits for its scores
        return self._choice(index, self._echo, None, [])

    def prompt_delta(self, index: int, entries: list[Entry] | None) -> dict[str, Any] | None:
        return self._choice(index, self._echo, None, entries or [])

    def _choice(self, index: int, text: str, finish_reason: str | None, entries: list[Entry]) -> dict[str, Any]:
        columns = self._columns.setdefault(index, CompletionLogprobs())
        logprobs = columns.block(entries) if self.options.logprobs else None
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


class _ChatShape(_Shape):
    id_prefix = "chatcmpl-"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, options: SamplingOptions) -> None:
        super().__init__(options)
        self._calls = ToolCallParser() if options.tools else None  # tools come with one choice only

    def choice(self, index: int, text: str, finish_reason: str, result: _Choice) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self._calls is not None:
            content, calls = _gathered(self._calls.push(text))
            message = {"role": "assistant", "content": content or None, **({"tool_calls": calls} if calls else {})}
            finish_reason = self.finish_reason(finish_reason)
        return {"index": index, "message": message, "logprobs": self._logprobs(result.entries),
                "finish_reason": finish_reason}  # fmt: skip

    def delta(self, index: int, text: str | None, finish_reason: str | None, entries: list[Entry]) -> dict[str, Any]:
        delta = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": self._logprobs(entries), "finish_reason": finish_reason}

    def opening_delta(self, index: int) -> dict[str, Any] | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}  # fmt: skip

    def deltas(self, index: int, text: str, entries: list[Entry]) -> list[dict[str, Any]]:
        if self._calls is None:
            return super().deltas(index, text, entries)
        return [_delta_of(event) for event in self._calls.push(text)]

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self._calls is not None and self._calls.calls and reason == "stop" else reason

    def _logprobs(self, entries: list[Entry]) -> dict[str, Any] | None:
        return chat_logprobs(entries) if self.options.logprobs else None


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


async def _answer(req: Request, resp: falcon.asgi.Response, shape: _Shape, streams: list[Stream]) -> None:
    if shape.options.stream:
        resp.content_type = SSE_CONTENT_TYPE
        resp.set_headers(SSE_HEADERS)
        resp.stream = ClientStream(req, _stream_chunks(shape, streams))
        return
    try:
        results = await _all([_collect(upstream) for upstream in streams])
    finally:
        for upstream in streams:
            upstream.close()
    ranked = sorted(results, key=lambda result: -result.score) if shape.options.best_of > shape.options.n else results
    choices = [
        shape.choice(index, result.done["outputs"], _finish_reason(result.done), result)  # type: ignore[index]
        for index, result in enumerate(ranked[: shape.options.n])
    ]
    resp.media = {**shape.envelope(shape.object_name, choices), "usage": _usage([r.done for r in results])}


async def _all(calls: list[Awaitable[_Choice]]) -> list[_Choice]:
    """Every call's result; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def _collect(upstream: Stream) -> _Choice:
    """One generation's whole answer."""
    result, events = _Choice(), _events(upstream)
    try:
        async for event, data in _checked(events):
            if event == "token" and "logprobs" in data:
                result.entries.append(data["logprobs"])
            elif event == "prompt":
                result.prompt_entries = data["logprobs"]
            elif event == "done":
                result.done = data
                return result
    finally:
        await events.aclose()
    raise ServiceUnavailable("The inference replica ended the answer early; retry")


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


async def _one_choice(upstream: Stream) -> ChoiceEvents:
    events = _events(upstream)
    try:
        async for event, data in _checked(events):
            yield 0, event, data
    finally:
        await events.aclose()


async def _interleaved(streams: list[Stream]) -> ChoiceEvents:
    """Several generations' events as they come, each with its choice's index; the first error is
    raised, and closing stops them all. (Each choice is at most max_tokens events: the queue is
    left unbounded.)"""
    queue: asyncio.Queue[tuple[int, str, Any] | None] = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async for event in _one_choice(streams[index]):
                queue.put_nowait((index, *event[1:]))
        except ApiError as error:
            queue.put_nowait((index, "failed", error))
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.ensure_future(pump(index)) for index in range(len(streams))]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif item[1] == "failed":
                raise item[2]
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


async def _stream_chunks(shape: _Shape, streams: list[Stream]) -> AsyncIterator[bytes]:
    """OpenAI's stream: a chunk per token of each choice, a last one per choice with its finish
    reason, usage, [DONE]."""
    extra = {"usage": None} if shape.options.include_usage else {}
    events = _one_choice(streams[0]) if len(streams) == 1 else _interleaved(streams)
    done: list[dict[str, Any]] = []
    try:
        for index in range(len(streams)):
            if (opening := shape.opening_delta(index)) is not None:
                yield _chunk({**shape.envelope(shape.chunk_object_name, [opening]), **extra})
        async for index, event, data in events:
            for delta in _deltas(shape, index, event, data):
                yield _chunk({**shape.envelope(shape.chunk_object_name, [delta]), **extra})
            if event == "done":
                done.append(data)
        if shape.options.include_usage:
            yield _chunk({**shape.envelope(shape.chunk_object_name, []), "usage": _usage(done)})
        yield b"data: [DONE]\n\n"
    except ApiError as error:
        yield _chunk({"error": openai_error_body(error)})
    finally:
        await events.aclose()  # a client that went away stops the generations
        for upstream in streams:
            upstream.close()


def _deltas(shape: _Shape, index: int, event: str, data: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks' choices for one of a replica's events (none: nothing to send)."""
    if event == "prompt":
        delta = shape.prompt_delta(index, data["logprobs"])
        return [] if delta is None else [delta]
    if event == "token":
        entries = [data["logprobs"]] if "logprobs" in data and shape.options.logprobs else []
        return shape.deltas(index, data["text"], entries) if data["text"] or entries else []
    if event == "done":
        return [shape.delta(index, None, shape.finish_reason(_finish_reason(data)), [])]
    return []


def _chunk(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def _finish_reason(done: dict[str, Any]) -> str:
    return _FINISH_REASONS.get(done.get("finish_reason", ""), "stop")


def _usage(done: list[dict[str, Any]]) -> dict[str, Any]:
    """The prompt once (every choice's is the same), the tokens of every generation."""
    cached = int(done[0].get("cached_tokens", 0)) if done else 0
    prompt = int(done[0]["prompt_tokens"]) + cached if done else 0
    completion = sum(int(each["generated_tokens"]) for each in done)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
