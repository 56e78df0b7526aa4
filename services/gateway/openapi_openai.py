"""The OpenAI-compatible part of the OpenAPI document: ``/v1/models``, the completions, and the
tokenizer endpoints (vLLM's ``/tokenize`` and ``/detokenize``, under ``/v1``)."""

from __future__ import annotations

from typing import Any

from services.common.api.params import MAX_STOP_CHARS, MAX_STOP_SEQUENCES, REPETITION_PENALTY, SEED, TOP_P, Limits
from services.common.api.token_options import (
    COMPLETION_LOGPROBS,
    LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    PENALTY,
    TOKEN_ID,
    TOP_LOGPROBS,
)
from services.gateway.openai_params import (
    DEFAULT_MAX_CHOICES,
    MAX_MESSAGES,
    TEMPERATURE,
    completions_default_max_tokens,
)
from services.gateway.openai_tools import MAX_TOOLS


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def openai_schemas(limits: Limits, model: dict[str, Any], max_choices: int = DEFAULT_MAX_CHOICES) -> dict[str, Any]:
    """Request, answer and error schemas of the OpenAI-compatible API (``max_choices``: the gateway's
    OPENAI_MAX_CHOICES)."""
    choices = {"type": ["integer", "null"], "minimum": 1, "maximum": max_choices}
    max_tokens = {"type": ["integer", "null"], **limits.max_new_tokens_range.schema()}
    common = {
        "model": {
            **model,
            "description": "A name GET /v1/models lists; chat messages are written in its chat format.",
        },
        "max_tokens": max_tokens,
        "temperature": {
            "type": ["number", "null"],
            **TEMPERATURE.schema(),
            "default": 1,
            "description": "0 (or below 0.01) decodes greedily.",
        },
        "top_p": {"type": ["number", "null"], **TOP_P.schema(), "default": 1},
        "repetition_penalty": {
            "type": ["number", "null"],
            **REPETITION_PENALTY.schema(),
            "description": "vLLM's extension: transformers' repetition penalty (1: none).",
        },
        "stop": {
            "oneOf": [
                {"type": "null"},
                {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
                {
                    "type": "array",
                    "maxItems": MAX_STOP_SEQUENCES,
                    "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
                },
            ]
        },
        "seed": {
            "type": ["integer", "null"],
            **SEED.schema(),
            "description": "Makes sampling reproducible.",
        },
        "n": {**choices, "default": 1, "description": "Choices to return (OPENAI_MAX_CHOICES at most)."},
        **_shaping(),
        "stream": {"type": ["boolean", "null"], "default": False},
        "stream_options": {
            "type": ["object", "null"],
            "properties": {"include_usage": {"type": "boolean"}},
        },
        "user": {"description": "Ignored, whatever its value."},
        "response_format": _response_format(),
    }
    usage = {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            "prompt_tokens": {"type": "integer", "minimum": 0},
            "completion_tokens": {"type": "integer", "minimum": 0},
            "total_tokens": {"type": "integer", "minimum": 0},
            "prompt_tokens_details": {
                "type": "object",
                "properties": {
                    "cached_tokens": {
                        "type": "integer",
                        "minimum": 0,
                        "description": "Prompt tokens a continued conversation session already held.",
                    }
                },
            },
        },
    }
    text_part = {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    }
    return {
        "CompletionRequest": {
            "type": "object",
            "required": ["model", "prompt"],
            "properties": {
                **common,
                "prompt": {
                    "oneOf": [
                        {"type": "string", "minLength": 1, "maxLength": limits.max_input_chars},
                        {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 1,
                            "items": {"type": "string", "minLength": 1, "maxLength": limits.max_input_chars},
                        },
                    ]
                },
                "max_tokens": {**max_tokens, "default": completions_default_max_tokens(limits)},
                "logprobs": {
                    "type": ["integer", "null"],
                    **COMPLETION_LOGPROBS.schema(),
                    "description": "Each token's log-probability and this many alternatives'.",
                },
                "echo": {
                    "type": ["boolean", "null"],
                    "description": "The prompt before the text (and, with "
                    "logprobs, its tokens' scores; the first token's are null).",
                },
                "best_of": {
                    **choices,
                    "description": "Choices generated; the n of highest cumulative "
                    "log-probability are returned (not with stream). At least n.",
                },
            },
        },
        "ChatCompletionRequest": {
            "type": "object",
            "required": ["model", "messages"],
            "properties": {
                **common,
                "messages": _ref("ChatMessages"),
                **_tool_parameters(),
                "max_tokens": {**max_tokens, "description": "Default: as many as the context allows."},
                "max_completion_tokens": max_tokens,
                "logprobs": {"type": ["boolean", "null"], "description": "Each token's log-probability."},
                "top_logprobs": {
                    "type": ["integer", "null"],
                    **TOP_LOGPROBS.schema(),
                    "description": "Alternatives per token (needs logprobs: true).",
                },
            },
        },
        "Completion": _answer("text_completion", "text", {"type": "string"}, _completion_logprobs()),
        "ChatCompletion": _answer(
            "chat.completion",
            "message",
            {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"const": "assistant"},
                    "content": {"type": ["string", "null"], "description": "null when the answer is tool calls."},
                    "tool_calls": {"type": "array", "items": _ref("ToolCall")},
                },
            },
            {
                "type": ["object", "null"],
                "required": ["content"],
                "properties": {"content": {"type": "array", "items": _ref("TokenLogprob")}},
            },
        ),
        "TokenLogprob": _token_logprob(),
        "TokenizeRequest": _tokenize_request(limits),
        "Tokenized": {
            "type": "object",
            "required": ["count", "max_model_len", "tokens"],
            "properties": {
                "count": {"type": "integer", "minimum": 0},
                "max_model_len": {"type": "integer", "minimum": 1},
                "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            },
        },
        "DetokenizeRequest": {
            "type": "object",
            "required": ["tokens"],
            "properties": {
                "model": model,
                "tokens": {
                    "type": "array",
                    "maxItems": limits.max_input_chars,
                    "items": {"type": "integer", **TOKEN_ID.schema()},
                },
            },
        },
        "Detokenized": {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        "ChatMessages": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_MESSAGES,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {
                    "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
                    "content": {
                        "oneOf": [{"type": "string"}, {"type": "array", "items": text_part}, {"type": "null"}],
                        "description": "Required but for an assistant message with tool_calls.",
                    },
                    "tool_calls": {"type": "array", "items": _ref("ToolCall")},
                    "tool_call_id": {"type": "string"},
                },
            },
        },
        "ToolCall": {
            "type": "object",
            "required": ["id", "type", "function"],
            "properties": {
                "id": {"type": "string"},
                "type": {"const": "function"},
                "function": {
                    "type": "object",
                    "required": ["name", "arguments"],
                    "properties": {
                        "name": {"type": "string"},
                        "arguments": {"type": "string", "description": "JSON valid against the parameters' schema."},
                    },
                },
            },
        },
        "Usage": usage,
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}},
        },
        "Model": _model(),
        "ChatFormat": _chat_format(),
        "OpenAIError": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"enum": ["invalid_request_error", "rate_limit_error", "server_error"]},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                }
            },
        },
    }


def _response_format() -> dict[str, Any]:
    """``response_format``: text, any JSON object, or JSON valid against a schema (constrained decoding)."""
    json_schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "schema": {"type": "object", "description": "A JSON Schema; one llguidance cannot compile is a 400."},
            "strict": {"type": ["boolean", "null"], "description": "Always enforced, strict or not."},
        },
    }
    return {
        "oneOf": [
            {"type": "null"},
            {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
            {
                "type": "object",
                "required": ["type", "json_schema"],
                "properties": {"type": {"const": "json_schema"}, "json_schema": json_schema},
            },
        ],
        "description": "The output always parses (json_object) and validates (json_schema): constrained decoding.",
    }


def _tool_parameters() -> dict[str, Any]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` (docs/api.md, "Tools")."""
    function = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            "description": {"type": "string"},
            "parameters": {"type": "object", "description": "A JSON Schema; the arguments always validate."},
        },
    }
    named = {
        "type": "object",
        "required": ["type", "function"],
        "properties": {
            "type": {"const": "function"},
            "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
        },
    }
    return {
        "tools": {
            "type": ["array", "null"],
            "maxItems": MAX_TOOLS,
            "items": {
                "type": "object",
                "required": ["type", "function"],
                "properties": {"type": {"const": "function"}, "function": function},
            },
        },
        "tool_choice": {"oneOf": [{"type": "null"}, {"enum": ["none", "auto", "required"]}, named]},
        "parallel_tool_calls": {"type": ["boolean", "null"], "default": True},
    }


def _model() -> dict[str, Any]:
    """OpenAI's model object plus the model card (OpenAI's clients ignore the fields they do not know)."""
    defaults = {
        "type": "object",
        "required": ["do_sample", "temperature", "top_p", "max_new_tokens"],
        "properties": {
            "do_sample": {"type": "boolean"},
            "temperature": {"type": "number", "exclusiveMinimum": 0},
            "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "max_new_tokens": {"type": "integer", "minimum": 1},
        },
        "description": "The chat page's initial generation settings for this model.",
    }
    return {
        "type": "object",
        "required": ["id", "object", "created", "owned_by", "default", "description", "chat", "defaults", "max_length"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "default": {"type": "boolean", "description": "The model of requests that name none (listed first)."},
            "description": {"type": "string", "description": "One line about the model (may be empty)."},
            "chat": _ref("ChatFormat"),
            "defaults": defaults,
            "max_length": {"type": "integer", "minimum": 1, "description": "The most tokens a session may hold."},
        },
    }


def _chat_format() -> dict[str, Any]:
    """How the model's dialogue is written (services/common/chat/formats.py)."""
    text = {"type": "string"}
    pieces = ["system_start", "system_end", "user_start", "user_end", "assistant_start", "assistant_end"]
    return {
        "type": "object",
        "required": ["name", "system_prompt", *pieces, "stop", "end_of_turn"],
        "properties": {
            "name": {"type": "string", "description": "human-ai or chatml"},
            "system_prompt": {"type": "string", "description": "The system message of a chat that has none."},
            **{piece: text for piece in pieces},
            "stop": {"type": "array", "items": {"type": "string", "minLength": 1}, "description": "Ends an answer."},
            "end_of_turn": {"type": "string", "description": "The text the model's end-of-sequence token stands for."},
        },
        "description": "A turn is written <role>_start + content + <role>_end; the prompt ends with assistant_start.",
    }


def _shaping() -> dict[str, Any]:
    """Penalties and logit_bias, with OpenAI's ranges."""
    penalty = {"type": ["number", "null"], **PENALTY.schema(), "default": 0}
    return {
        "presence_penalty": {**penalty, "description": "Subtracted once from every token already generated."},
        "frequency_penalty": {**penalty, "description": "Subtracted per time a token was generated."},
        "logit_bias": {
            "type": ["object", "null"],
            "maxProperties": MAX_LOGIT_BIAS_ENTRIES,
            "propertyNames": {"pattern": "^[0-9]+$"},
            "additionalProperties": {"type": "number", **LOGIT_BIAS.schema()},
            "description": "Token id (the model's, see /v1/tokenize) -> bias added to its logit.",
        },
    }


def _token_logprob() -> dict[str, Any]:
    """Chat's entry for one token (and, without top_logprobs, each alternative)."""
    alternative = {
        "type": "object",
        "required": ["token", "logprob", "bytes"],
        "properties": {
            "token": {"type": "string"},
            "logprob": {"type": "number", "maximum": 0},
            "bytes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}},
        },
    }
    properties = {**alternative["properties"], "top_logprobs": {"type": "array", "items": alternative}}
    return {**alternative, "required": [*alternative["required"], "top_logprobs"], "properties": properties}


def _completion_logprobs() -> dict[str, Any]:
    """Completions' legacy columns: one entry per token (a prompt's first token: null scores)."""
    nullable_number = {"type": ["number", "null"]}
    return {
        "type": ["object", "null"],
        "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
        "properties": {
            "tokens": {"type": "array", "items": {"type": "string"}},
            "token_logprobs": {"type": "array", "items": nullable_number},
            "top_logprobs": {
                "type": "array",
                "items": {"type": ["object", "null"], "additionalProperties": {"type": "number"}},
            },
            "text_offset": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        },
    }


def _tokenize_request(limits: Limits) -> dict[str, Any]:
    """vLLM's: a prompt, or chat messages (rendered as the chat endpoint renders them)."""
    model = {"type": "string", "description": "A name GET /v1/models lists (default: the default model)."}
    return {
        "oneOf": [
            {
                "type": "object",
                "required": ["prompt"],
                "properties": {
                    "model": model,
                    "prompt": {"type": "string", "maxLength": limits.max_input_chars},
                    "add_special_tokens": {"type": "boolean", "default": True},
                },
            },
            {
                "type": "object",
                "required": ["messages"],
                "properties": {"model": model, "messages": {"$ref": "#/components/schemas/ChatMessages"}},
            },
        ]
    }


def _answer(object_name: str, field: str, field_schema: dict[str, Any], logprobs: dict[str, Any]) -> dict[str, Any]:
    """A (non-streamed) completion: its choices carrying ``field`` and their ``logprobs``, and the usage."""
    choice = {
        "type": "object",
        "required": ["index", field, "finish_reason"],
        "properties": {
            "index": {"type": "integer", "minimum": 0},
            field: field_schema,
            "logprobs": logprobs,
            "finish_reason": {"enum": ["stop", "length", "tool_calls"], "description": "tool_calls: chat only."},
        },
    }
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": object_name},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": _ref("Usage"),
        },
    }


def openai_paths() -> dict[str, Any]:
    """The three operations, with OpenAI's error shape for every failure."""
    errors = {
        str(code): {"description": text, "content": {"application/json": {"schema": _ref("OpenAIError")}}}
        for code, text in [
            (400, "Invalid request (the error names the parameter, or a token id outside the vocabulary)"),
            (404, "Unknown model (code model_not_found; the message lists the served ones)"),
            (413, "Body, prompt or messages too large"),
            (429, "Rate limited (see Retry-After)"),
            (502, "The swarm or a replica failed during generation; retry"),
            (503, "No ready replica, model loading or swarm unreachable (see Retry-After)"),
        ]
    }
    stream = (
        "With `stream: true`, Server-Sent Events: `data: <chunk JSON>` per token, a last chunk with the "
        "finish_reason, a usage chunk if `stream_options.include_usage`, then `data: [DONE]`. An error after "
        'the stream started arrives as `data: {"error": ...}`.'
    )
    return {
        "/v1/models": {
            "get": {
                "summary": "OpenAI-compatible: every served model with its card, the default one first",
                "responses": {
                    "200": {
                        "description": "The model list",
                        "content": {"application/json": {"schema": _ref("ModelList")}},
                    },
                    "429": errors["429"],
                },
            }
        },
        "/v1/completions": _generation(
            "Completion", "CompletionRequest", "OpenAI-compatible text completion", stream, errors
        ),
        "/v1/chat/completions": _generation(
            "ChatCompletion",
            "ChatCompletionRequest",
            "OpenAI-compatible chat completion (messages written in the model's chat format, or with its "
            "replica's chat template; a follow-up that extends an earlier conversation continues its inference "
            "session)",
            stream,
            errors,
        ),
        "/v1/tokenize": _tokenizer("Tokenized", "TokenizeRequest", "vLLM's tokenize: a prompt's token ids", errors),
        "/v1/detokenize": _tokenizer("Detokenized", "DetokenizeRequest", "vLLM's detokenize: token ids' text", errors),
    }


def _tokenizer(answer: str, request: str, summary: str, errors: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
            "responses": {
                "200": {"description": "The answer", "content": {"application/json": {"schema": _ref(answer)}}},
                **{code: errors[code] for code in ("400", "404", "413", "429", "503")},
            },
        }
    }


def _generation(answer: str, request: str, summary: str, stream: str, errors: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "description": stream,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
            "responses": {
                "200": {
                    "description": "The answer (JSON), or its stream",
                    "content": {
                        "application/json": {"schema": _ref(answer)},
                        # Each event: a JSON chunk in its data line, then data: [DONE].
                        "text/event-stream": {
                            "schema": {
                                "type": "object",
                                "required": ["data"],
                                "properties": {"data": {"type": "string"}},
                            }
                        },
                    },
                },
                **errors,
            },
        }
    }
