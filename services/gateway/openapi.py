"""The OpenAPI 3.1 document of the public API, served by the gateway at /api/openapi.json."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.common.api.params import (
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    MODEL_NAME_PATTERN,
    REPETITION_PENALTY,
    SEED,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    Limits,
)
from services.gateway.openai_params import DEFAULT_MAX_CHOICES
from services.gateway.openapi_openai import openai_paths, openai_schemas
from services.gateway.openapi_swarm import swarm_paths, swarm_schemas
from services.gateway.replicas import ReplicaSet


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _query(name: str, schema: dict[str, Any], required: bool, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


def _sse_event(event: str, data_schema: str) -> dict[str, Any]:
    """One Server-Sent Event as clients parse it: its name and its JSON ``data`` line."""
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": _ref(data_schema)}
    return {"type": "object", "required": ["event", "data"], "properties": {"event": {"const": event}, "data": data}}


def model_schema(models: Sequence[str]) -> dict[str, Any]:
    """A model name: one of ``models`` (those served when the document was asked for), if any is known."""
    return {"type": "string", "pattern": MODEL_NAME_PATTERN.pattern, **({"enum": list(models)} if models else {})}


# What validation requires of a generate request beyond each field's own schema.
ONE_LENGTH = {
    "oneOf": [
        {"required": ["max_new_tokens"], "not": {"required": ["max_length"]}},
        {"required": ["max_length"], "not": {"required": ["max_new_tokens"]}},
    ]
}
INPUTS_OR_SESSION = {
    "anyOf": [{"required": ["session_id"]}, {"required": ["inputs"], "properties": {"inputs": {"minLength": 1}}}]
}
JSON_SCHEMA_PARAMETER = {
    "type": ["object", "string"],
    "description": "Structured output: the output is a JSON document valid against this JSON Schema (an object, "
    "or its JSON text), by constrained decoding (llguidance). A schema it cannot compile is a 400 naming the part.",
}
MODEL_DESCRIPTION = "The model (a name GET /v1/models lists); omitted: the default model, or the session's."


def _schemas(limits: Limits, model: dict[str, Any]) -> dict[str, Any]:
    error_envelope = {
        "type": "object",
        "required": ["ok", "traceback"],
        "properties": {"ok": {"const": False}, "traceback": {"type": "string", "description": "A clear message."}},
    }
    generate_parameters = {
        "inputs": {"type": "string", "maxLength": limits.max_input_chars},
        "max_new_tokens": {"type": "integer", **limits.max_new_tokens_range.schema()},
        "max_length": {"type": "integer", **limits.max_length_range.schema()},
        "do_sample": {"type": ["integer", "boolean"], "enum": [0, 1, True, False], "default": 0},
        "temperature": {"type": "number", **TEMPERATURE.schema()},
        "top_k": {"type": "integer", **TOP_K.schema()},
        "top_p": {"type": "number", **TOP_P.schema()},
        "session_id": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"},
        "seed": {"type": "integer", **SEED.schema(), "description": "Reproducible sampling."},
        "repetition_penalty": {
            "type": "number",
            **REPETITION_PENALTY.schema(),
            "description": "transformers' repetition penalty over every token of the session (1: none).",
        },
        "model": {**model, "description": MODEL_DESCRIPTION + " With a session_id, it must be the session's."},
        "json_schema": JSON_SCHEMA_PARAMETER,
        "stop": {
            "oneOf": [
                {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
                {
                    "type": "array",
                    "maxItems": MAX_STOP_SEQUENCES,
                    "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
                },
            ]
        },
    }
    return {
        "GenerateRequest": {
            "type": "object",
            "properties": generate_parameters,
            "allOf": [ONE_LENGTH, INPUTS_OR_SESSION],
            "description": "Exactly one of max_new_tokens and max_length. inputs is required without session_id.",
        },
        "GenerateOk": {
            "type": "object",
            "required": ["ok", "outputs"],
            "properties": {"ok": {"const": True}, "outputs": {"type": "string"}},
        },
        "SessionOk": {
            "type": "object",
            "required": ["ok", "session_id"],
            "properties": {"ok": {"const": True}, "session_id": {"type": "string"}},
        },
        "Ok": {"type": "object", "required": ["ok"], "properties": {"ok": {"const": True}}},
        "V1Error": error_envelope,
        "Error": {
            "type": "object",
            "required": ["ok", "error"],
            "properties": {
                "ok": {"const": False},
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                },
            },
        },
        "TokenEvent": {
            "type": "object",
            "required": ["text", "generated_tokens"],
            "properties": {"text": {"type": "string"}, "generated_tokens": {"type": "integer", "minimum": 1}},
        },
        "SocketOpen": {
            "type": "object",
            "required": ["type", "max_length"],
            "properties": {
                "type": {"const": "open_inference_session"},
                "model": {**model, "description": "The session's model; omitted: the default model."},
                "max_length": {"type": "integer", **limits.max_length_range.schema()},
            },
            "description": "The first message of a connection: opens its inference session.",
        },
        "SocketGenerate": {
            "type": "object",
            "required": ["type"],
            "properties": {
                "type": {"const": "generate"},
                **{
                    name: schema
                    for name, schema in generate_parameters.items()
                    if name not in ("session_id", "stop", "json_schema")
                },
                "stop_sequence": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
                "extra_stop_sequences": {
                    "type": "array",
                    "maxItems": MAX_STOP_SEQUENCES,
                    "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
                    "description": "Need stop_sequence to be exactly one token; ending on one of them continues "
                    "the session as if stop_sequence had been generated.",
                },
            },
            "description": "v1's parameters in the connection's session (inputs optional after the first). With "
            "stop_sequence, max_new_tokens are generated at a time and each step is answered until the text "
            "ends with stop_sequence or an extra one, or the session is full.",
        },
        "SocketAnswer": {
            "type": "object",
            "required": ["ok"],
            "properties": {
                "ok": {"const": True},
                "outputs": {"type": "string", "description": "New text (includes the stop sequence)."},
                "stop": {"type": "boolean", "description": "The answer's last message."},
                "token_count": {"type": "integer", "minimum": 0, "description": "Tokens in this message."},
            },
            "description": '{"ok": true} answers open_inference_session; the others answer generate.',
        },
        "DoneEvent": {
            "type": "object",
            "required": ["ok", "outputs", "prompt_tokens", "generated_tokens", "finish_reason"],
            "properties": {
                "ok": {"const": True},
                "outputs": {"type": "string"},
                "prompt_tokens": {"type": "integer", "minimum": 0, "description": "Sent through the swarm."},
                "cached_tokens": {"type": "integer", "minimum": 0, "description": "Already held by the session."},
                "generated_tokens": {"type": "integer", "minimum": 0},
                "finish_reason": {"enum": ["length", "stop", "eos"]},
                "stop_sequence": {"type": ["string", "null"]},
                "seconds_per_token": {"type": ["number", "null"]},
            },
        },
    }


def build_openapi(
    limits: Limits, models: Sequence[str] = (), *, api_keys: bool = False, max_choices: int = DEFAULT_MAX_CHOICES
) -> dict[str, Any]:
    """The document; limits are the ones the gateway enforces, ``models`` the ones served now
    (``api_keys``: it requires keys; ``max_choices``: the OpenAI API's OPENAI_MAX_CHOICES)."""
    document = _document(limits, models, max_choices)
    return _with_api_keys(document) if api_keys else document


# The operations open to everyone with keys on (the resources marked ``public``).
PUBLIC_PATHS = ("/healthz", "/readyz", "/metrics", "/api/openapi.json")


def _with_api_keys(document: dict[str, Any]) -> dict[str, Any]:
    """Every operation needs a key (Bearer, or X-API-Key), except the public ones."""
    document["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"},
        "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    document["security"] = [{"bearer": []}, {"apiKeyHeader": []}]
    for path in PUBLIC_PATHS:
        document["paths"][path]["get"]["security"] = []
    document["paths"]["/api/v2/generate"]["get"]["description"] += (
        " The handshake's key: a header as above or, from a browser, the subprotocols"
        ' ["petals-chat", "bearer.<key>"] (answered with petals-chat), or ?api_key=<key>.'
    )
    return document


def _document(limits: Limits, models: Sequence[str], max_choices: int) -> dict[str, Any]:
    model = model_schema(models)
    v1_answer = {"oneOf": [_ref("GenerateOk"), _ref("V1Error")]}
    errors = {
        str(code): {"description": text, "content": _json(_ref("Error"))}
        for code, text in [
            (
                400,
                "Invalid parameter (code model_mismatch: not the session's model; session_full: no room left; "
                "max_length beyond what the model's servers hold: its max_length in /v1/models)",
            ),
            (
                404,
                "Unknown or expired session (its replica may be gone, or it is another client's), or unknown "
                "model (code model_not_found)",
            ),
            (409, "The session is busy with another request"),
            (413, "Body or inputs too large"),
            (429, "Rate limited (see Retry-After)"),
            (
                503,
                "No ready replica, model loading, swarm unreachable, or the replicas' limits of sessions and of "
                "requests without a session reached (code too_many_sessions; see Retry-After)",
            ),
        ]
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Petals Chat API",
            "version": "1.0.0",
            "description": "LLM inference through a Petals swarm. v1 keeps the original Petals chat contract: "
            "application errors are HTTP 200 with ok=false. v2 uses real HTTP status codes. /v1/* is "
            "OpenAI-compatible (models, completions, chat completions) with OpenAI's error shape. Several models "
            "may be served: every request may name its model (/v1/models lists them); one that names none gets "
            "the default model, and a session stays on the model it was opened for.",
        },
        "paths": {
            "/api/v1/generate": {
                "post": {
                    "summary": "Generate text (one answer)",
                    "description": "Parameters as a form, a JSON object or a query string.",
                    "requestBody": {
                        "content": {
                            "application/json": {"schema": _ref("GenerateRequest")},
                            "application/x-www-form-urlencoded": {"schema": _ref("GenerateRequest")},
                        }
                    },
                    "responses": {
                        "200": {"description": "ok=true with the new text, or ok=false", "content": _json(v1_answer)}
                    },
                }
            },
            "/api/v1/open_inference_session": {
                "get": {
                    "summary": "Open an inference session",
                    "parameters": [
                        _query(
                            "max_length",
                            {"type": "integer", **limits.max_length_range.schema()},
                            True,
                            "Tokens the session can hold (prompts and generated text).",
                        ),
                        _query("model", model, False, "The session's model; omitted: the default model."),
                    ],
                    "responses": {
                        "200": {
                            "description": "The session id, or ok=false",
                            "content": _json({"oneOf": [_ref("SessionOk"), _ref("V1Error")]}),
                        }
                    },
                }
            },
            "/api/v1/close_inference_session": {
                "get": {
                    "summary": "Close an inference session",
                    "parameters": [
                        _query("session_id", {"type": "string"}, True, "The session to close."),
                        _query("model", model, False, "Optional: must be the session's model."),
                    ],
                    "responses": {
                        "200": {
                            "description": "ok=true, or ok=false",
                            "content": _json({"oneOf": [_ref("Ok"), _ref("V1Error")]}),
                        }
                    },
                }
            },
            "/api/v2/generate_stream": {
                "post": {
                    "summary": "Generate text as Server-Sent Events",
                    "description": "Events: `token` (TokenEvent, one per generated token; text may be empty while "
                    "a character or a possible stop sequence is incomplete), then `done` (DoneEvent), or `error` "
                    "(Error) if the generation fails once started.",
                    "requestBody": {"required": True, "content": _json(_ref("GenerateRequest"))},
                    "responses": {
                        "200": {
                            "description": "An event stream",
                            "content": {
                                "text/event-stream": {
                                    # Each event (OpenAPI 3.1 has no itemSchema; 3.2 would name it so).
                                    "schema": {
                                        "oneOf": [
                                            _sse_event("token", "TokenEvent"),
                                            _sse_event("done", "DoneEvent"),
                                            _sse_event("error", "Error"),
                                        ]
                                    },
                                    "x-events": {
                                        "token": _ref("TokenEvent"),
                                        "done": _ref("DoneEvent"),
                                        "error": _ref("Error"),
                                    },
                                }
                            },
                        },
                        **errors,
                    },
                }
            },
            "/api/v2/generate": {
                "get": {
                    "summary": "The WebSocket API (chat.petals.dev's protocol); OpenAPI cannot describe it fully",
                    "description": "Connect with a WebSocket (ws:// or wss://). JSON text messages: first "
                    'SocketOpen, answered {"ok": true}; then SocketGenerate messages, each answered by one or '
                    "more SocketAnswer messages, the last with stop=true. Errors: V1Error messages "
                    '({"ok": false, "traceback"}). One inference session per connection, closed with it. '
                    "OpenAPI 3.1 has no way to describe a WebSocket conversation: the messages are in x-websocket "
                    "and the whole protocol (step rule, errors, close codes, limits) in docs/api.md. "
                    "A plain HTTP GET is answered 426.",
                    "responses": {
                        "101": {"description": "Switching Protocols: the WebSocket conversation begins"},
                        "426": {
                            "description": "Upgrade Required: not a WebSocket handshake",
                            "content": _json(_ref("Error")),
                        },
                    },
                    "x-websocket": {
                        "client-messages": {"oneOf": [_ref("SocketOpen"), _ref("SocketGenerate")]},
                        "server-messages": {"oneOf": [_ref("SocketAnswer"), _ref("V1Error")]},
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "responses": {
                        "200": {"description": "Alive", "content": _json({"type": "object", "required": ["ok"]})}
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: at least one inference replica is ready",
                    "responses": {
                        "200": {"description": "Ready", "content": _json({"type": "object"})},
                        "503": {"description": "Not ready", "content": _json({"type": "object"})},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Text exposition",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            **swarm_paths(model),
            **openai_paths(),
            "/api/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": {"description": "OpenAPI 3.1", "content": _json({"type": "object"})}},
                }
            },
        },
        "components": {
            "schemas": {**_schemas(limits, model), **openai_schemas(limits, model, max_choices), **swarm_schemas()},
        },
    }


class OpenApiResource:
    """``GET /api/openapi.json``: built again when the models served change."""

    public = True  # the API's description needs no key (services/gateway/auth.py)

    def __init__(
        self, limits: Limits, replicas: ReplicaSet, *, api_keys: bool = False, max_choices: int = DEFAULT_MAX_CHOICES
    ) -> None:
        self._limits = limits
        self._replicas = replicas
        self._api_keys = api_keys
        self._max_choices = max_choices
        self._documents: dict[tuple[str, ...], dict[str, Any]] = {}

    async def on_get(self, req, resp) -> None:
        models = tuple(sorted(card.name for card in self._replicas.cards()))
        if models not in self._documents:
            self._documents = {
                models: build_openapi(self._limits, models, api_keys=self._api_keys, max_choices=self._max_choices)
            }  # only the latest is kept
        resp.media = self._documents[models]
