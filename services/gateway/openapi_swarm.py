"""The swarm's part of the OpenAPI document: ``GET /api/v2/swarm`` and its ``ModelSwarm`` schema
(the shape of services/common/api/swarm_state.py)."""

from __future__ import annotations

from typing import Any

from services.common.api.swarm_state import SERVER_STATES, SwarmHealth


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


COUNT = {"type": "integer", "minimum": 0}
OPTIONAL_COUNT = {"type": ["integer", "null"], "minimum": 0}


def swarm_schemas() -> dict[str, Any]:
    """``ModelSwarm``, one server of it (``SwarmServer``), and the list of every model's."""
    server = {
        "peer_id": {"type": "string"},
        "start_block": {"type": "integer", "description": "The first block it holds (0: the model's first)."},
        "end_block": {"type": "integer", "description": "The block after its last one."},
        "state": {"enum": list(SERVER_STATES)},
        "throughput": {"type": ["number", "null"], "description": "Announced, in requests per second."},
        "cache_tokens_left": {**OPTIONAL_COUNT, "description": "Attention cache room it announces, in tokens."},
        "version": {"type": ["string", "null"], "description": "Its Petals version."},
    }
    swarm = {
        "model": {"type": "string"},
        "state": {
            "enum": [str(health) for health in SwarmHealth],
            "description": "broken: some block has no online server (no full route); degraded: fewer online "
            "servers on some block than the replicas' SWARM_STATE_MIN_REDUNDANCY, or less cache room than "
            "SWARM_STATE_MIN_CACHE_TOKENS; unknown: never read yet.",
        },
        "num_blocks": COUNT,
        "full_route": {"type": "boolean", "description": "Every block has an online server."},
        "coverage": {"type": "array", "items": COUNT, "description": "Online servers per block."},
        "min_redundancy": {**COUNT, "description": "The fewest online servers on any block."},
        "blocks_without_server": {
            "type": "array",
            "items": {"type": "array", "prefixItems": [COUNT, COUNT], "minItems": 2, "maxItems": 2},
            "description": "[start, end) ranges of blocks no online server holds.",
        },
        "servers_total": COUNT,
        "servers_by_state": {
            "type": "object",
            "required": list(SERVER_STATES),
            "properties": {state: COUNT for state in SERVER_STATES},
        },
        "servers": {
            "type": "array",
            "items": _ref("SwarmServer"),
            "description": "At most the replicas' SWARM_STATE_MAX_SERVERS: online first, the fastest first.",
        },
        "servers_truncated": {"type": "boolean", "description": "More servers than listed."},
        "cache_tokens_left": {**OPTIONAL_COUNT, "description": "Summed over the online servers announcing it."},
        "min_block_cache_tokens_left": {
            **OPTIONAL_COUNT,
            "description": "The tightest block's cache room, summed over its online servers (null: one of them "
            "does not announce it).",
        },
        "updated_at": {"type": ["string", "null"], "format": "date-time", "description": "When it was read (UTC)."},
        "refresh_seconds": {"type": "number", "minimum": 0, "description": "How often it is read."},
    }
    return {
        "SwarmServer": {"type": "object", "required": list(server), "properties": server},
        "ModelSwarm": {"type": "object", "required": list(swarm), "properties": swarm},
        "SwarmList": {
            "type": "object",
            "required": ["models"],
            "properties": {"models": {"type": "array", "items": _ref("ModelSwarm")}},
        },
    }


def swarm_paths(model: dict[str, Any]) -> dict[str, Any]:
    """``GET /api/v2/swarm``."""
    return {
        "/api/v2/swarm": {
            "get": {
                "summary": "The swarm's state per model: coverage per block, servers, cache room",
                "description": "As the inference replicas read it from the swarm's DHT in the background (every "
                "refresh_seconds). Without model: every served model's (the default one first), as SwarmList; "
                "with model: that one's, as ModelSwarm.",
                "parameters": [
                    {
                        "name": "model",
                        "in": "query",
                        "required": False,
                        "schema": model,
                        "description": "One model (a name GET /v1/models lists); omitted: every model.",
                    }
                ],
                "responses": {
                    "200": {
                        "description": "One model's swarm, or every model's",
                        "content": _json({"oneOf": [_ref("ModelSwarm"), _ref("SwarmList")]}),
                    },
                    "400": {"description": "Not a model name", "content": _json(_ref("Error"))},
                    "404": {"description": "Model not served (code model_not_found)", "content": _json(_ref("Error"))},
                    "503": {
                        "description": "No replica has reported its model yet, or none of the model's answers",
                        "content": _json(_ref("Error")),
                    },
                },
            }
        }
    }
