"""The gateway's Prometheus metrics (request metrics live in services.common.web.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.web.metrics import REQUEST_BUCKETS

UPSTREAM_LATENCY = Histogram(
    "petals_chat_gateway_upstream_duration_seconds",
    "Time until an inference replica answered (headers; streams are timed to their first byte), by replica and route.",
    ["replica", "endpoint"],
    buckets=REQUEST_BUCKETS,
)
ROUTING_DECISIONS = Counter(
    "petals_chat_gateway_routing_decisions",
    "Where requests were sent: new_session (least-loaded of the model), session (the replica in its id), "
    "sessionless (least-loaded of the model), conversation (by affinity), or why none: unknown_replica, "
    "replica_down, no_ready_replica, unknown_model, model_mismatch.",
    ["decision", "replica"],
)
UPSTREAM_ERRORS = Counter(
    "petals_chat_gateway_upstream_errors",
    "Failed calls to inference replicas, by kind: connect (refused, unreachable), timeout, protocol.",
    ["replica", "kind"],
)
UI_LATENCY = Histogram(
    "petals_chat_gateway_ui_duration_seconds",
    "Time until the ui service answered a forwarded page or asset request.",
    buckets=REQUEST_BUCKETS,
)
UI_ERRORS = Counter(
    "petals_chat_gateway_ui_errors",
    "Failed calls to the ui service, by kind: connect (refused, unreachable), timeout, protocol.",
    ["kind"],
)
WEBSOCKET_CONNECTIONS = Gauge(
    "petals_chat_gateway_websocket_connections",
    "WebSocket connections open now (/api/v2/generate), over the live gateway workers.",
    multiprocess_mode="livesum",
)
CLIENT_REQUESTS = Counter(
    "petals_chat_gateway_client_requests",
    "API requests (and WebSocket messages) by API key id (a configured id; anonymous: no key, or keys off; "
    "refused: a missing or wrong key) and semantic status.",
    ["key_id", "status"],
)
REQUESTS_WITHOUT_REPLICA = Counter(
    "petals_chat_gateway_requests_without_replica",
    "Requests for a model of INFERENCE_DISCOVERY (MODEL=dns://...) that had no replica answering (answered 503 "
    "model_starting): what an autoscaler (KEDA) wakes a model scaled to zero on. Only configured models.",
    ["model"],
)
