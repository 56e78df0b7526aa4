"""The inference service's Prometheus metrics (request metrics live in services.common.web.metrics)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

from services.common.api.swarm_state import SERVER_STATES, ModelSwarm, SwarmHealth

# From tens of milliseconds per token (a local swarm) to several seconds (the public swarm).
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.4, 0.6, 1.0, 1.5, 2.5, 4.0, 6.0, 10.0, 20.0)

TOKEN_LATENCY = Histogram(
    "petals_chat_token_latency_seconds",
    "Time to generate each token: one step through the swarm (a request's first token also includes its prompt).",
    buckets=TOKEN_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "petals_chat_time_to_first_token_seconds",
    "Time from the start of a generation to its first new token (includes processing the prompt).",
    buckets=TOKEN_BUCKETS,
)
PROMPT_TOKENS = Counter("petals_chat_prompt_tokens", "Input tokens sent through the swarm.")
CACHED_PROMPT_TOKENS = Counter(
    "petals_chat_cached_prompt_tokens",
    "Prompt tokens not sent through the swarm again because a conversation session already held them.",
)
CONVERSATION_LOOKUPS = Counter(
    "petals_chat_conversation_lookups",
    "Chat requests that continued a conversation session (hit) or started a new one (miss).",
    ["result"],
)
GENERATED_TOKENS = Counter("petals_chat_generated_tokens", "Tokens generated.")
ACTIVE_SESSIONS = Gauge(
    "petals_chat_active_sessions", "Inference sessions currently open on this replica.", multiprocess_mode="livesum"
)
SESSION_UTILIZATION = Gauge(
    "petals_chat_session_utilization",
    "Sessions held as a share of MAX_SESSIONS (0..1): each reserves attention caches on the swarm, so this is "
    "the replica's cache load (what an autoscaler and an endpoint picker read).",
    multiprocess_mode="livemax",
)
REQUESTS_RUNNING = Gauge(
    "petals_chat_requests_running",
    "Generations in progress on this replica (a request's, or a WebSocket message's steps).",
    multiprocess_mode="livesum",
)
REQUESTS_WAITING = Gauge(
    "petals_chat_requests_waiting",
    "Requests waiting before they can generate (for their session to finish moving to another replica); "
    "a replica queues nothing else: it refuses at once.",
    multiprocess_mode="livesum",
)
# The same figures under the names the Gateway API Inference Extension's model-server protocol recommends
# (its TotalQueuedRequests, TotalRunningRequests and KVCacheUtilization), for an endpoint picker.
QUEUED_REQUESTS_ALIAS = Gauge("vllm:num_requests_waiting", "Alias of petals_chat_requests_waiting.",
                              multiprocess_mode="livesum")  # fmt: skip
RUNNING_REQUESTS_ALIAS = Gauge("vllm:num_requests_running", "Alias of petals_chat_requests_running.",
                               multiprocess_mode="livesum")  # fmt: skip
CACHE_UTILIZATION_ALIAS = Gauge("vllm:kv_cache_usage_perc", "Alias of petals_chat_session_utilization.",
                                multiprocess_mode="livemax")  # fmt: skip
SESSIONS_OPENED = Counter("petals_chat_sessions_opened", "Inference sessions opened.")
SESSIONS_CLOSED = Counter(
    "petals_chat_sessions_closed",
    "Inference sessions closed, by reason: closed (by the client), expired (idle too long), "
    "failed (the swarm broke it), shutdown (replica stopping), evicted (an idle conversation session "
    "made room for a new one), handed_over (moved to another replica as this one stopped), "
    "handover_failed (could not be moved: its client gets the expired answer).",
    ["reason"],
)
HANDOVERS = Counter(
    "petals_chat_session_handovers",
    "Sessions this replica handed over as it stopped (result: done, failed), or adopted (result: adopted).",
    ["result"],
)
for _result in ("done", "failed", "adopted"):  # every series exists from the start, at 0
    HANDOVERS.labels(result=_result)
HEAD_BATCH_SIZE = Histogram(
    "petals_chat_inference_head_batch_size",
    "Tokens (of different sessions) per LM head product, with REPLICA_HEAD_BATCHING on: 1, a token alone.",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
STEP_BATCH_SESSIONS = Histogram(
    "petals_chat_inference_step_batch_sessions",
    "Sessions whose steps one grouped request to a server span carried, with REPLICA_STEP_BATCHING on: 1, a step "
    "alone.",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
HANDOVER_SECONDS = Histogram(
    "petals_chat_session_handover_seconds",
    "Time to hand one session over: sent, rebuilt on the swarm by the adopter, answered.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0),
)
SESSION_REBUILDS = Counter(
    "petals_chat_session_rebuilds",
    "Petals sessions rebuilt in place after a swarm failure (a fresh session with every token replayed).",
)
SWARM_READY = Gauge(
    "petals_chat_swarm_ready",
    "1 when the model is loaded and a route through the swarm serves every block, else 0.",
    multiprocess_mode="livemax",
)

# The swarm as this replica reads it (services/inference/swarm_watch.py). Labels: the model, a server
# state, a block index (bounded by the model's blocks), never a peer. Every replica of a model exports
# the same figures: aggregate with max by (model), never sum.
_SWARM = {"multiprocess_mode": "livemax"}
SWARM_SERVERS = Gauge(
    "petals_chat_swarm_servers", "Servers announcing the model's blocks, by state.", ["model", "state"], **_SWARM
)
SWARM_BLOCKS = Gauge("petals_chat_swarm_blocks", "Transformer blocks of the model.", ["model"], **_SWARM)
SWARM_BLOCKS_WITHOUT_SERVER = Gauge(
    "petals_chat_swarm_blocks_without_server", "Blocks of the model no online server holds.", ["model"], **_SWARM
)
SWARM_MIN_REDUNDANCY = Gauge(
    "petals_chat_swarm_min_redundancy", "The fewest online servers holding any block of the model.", ["model"], **_SWARM
)
SWARM_BLOCK_SERVERS = Gauge(
    "petals_chat_swarm_block_servers", "Online servers holding each block of the model.", ["model", "block"], **_SWARM
)
SWARM_CACHE_TOKENS_LEFT = Gauge(
    "petals_chat_swarm_cache_tokens_left",
    "Attention cache room (tokens) the model's online servers announce, summed.",
    ["model"],
    **_SWARM,
)
SWARM_MIN_BLOCK_CACHE_TOKENS_LEFT = Gauge(
    "petals_chat_swarm_min_block_cache_tokens_left",
    "The tightest block's attention cache room (tokens), summed over the online servers holding it.",
    ["model"],
    **_SWARM,
)
SWARM_HEALTH = Gauge(
    "petals_chat_swarm_health", "1 for the model's swarm state (healthy, degraded, broken, unknown), else 0.",
    ["model", "state"], **_SWARM,
)  # fmt: skip
SWARM_REFRESHED = Gauge(
    "petals_chat_swarm_refreshed_timestamp_seconds", "When the swarm's state was last read.", ["model"], **_SWARM
)


def record_swarm(swarm: ModelSwarm) -> None:
    """Set the swarm metrics from one summary."""
    model = swarm.model
    for state in SERVER_STATES:
        SWARM_SERVERS.labels(model=model, state=state).set(swarm.servers_by_state[state])
    for health in SwarmHealth:
        SWARM_HEALTH.labels(model=model, state=health).set(1 if swarm.state is health else 0)
    SWARM_BLOCKS.labels(model=model).set(swarm.num_blocks)
    SWARM_BLOCKS_WITHOUT_SERVER.labels(model=model).set(sum(end - start for start, end in swarm.blocks_without_server))
    SWARM_MIN_REDUNDANCY.labels(model=model).set(swarm.min_redundancy)
    for block, servers in enumerate(swarm.coverage):
        SWARM_BLOCK_SERVERS.labels(model=model, block=str(block)).set(servers)
    if swarm.cache_tokens_left is not None:
        SWARM_CACHE_TOKENS_LEFT.labels(model=model).set(swarm.cache_tokens_left)
    if swarm.min_block_cache_tokens_left is not None:
        SWARM_MIN_BLOCK_CACHE_TOKENS_LEFT.labels(model=model).set(swarm.min_block_cache_tokens_left)
    SWARM_REFRESHED.labels(model=model).set_to_current_time()


def publish_session_load(held: int, limit: int) -> None:
    """Sessions held against MAX_SESSIONS, under both names."""
    share = held / max(limit, 1)
    SESSION_UTILIZATION.set(share)
    CACHE_UTILIZATION_ALIAS.set(share)


@contextmanager
def counted(gauge: Gauge, alias: Gauge) -> Iterator[None]:
    """Count something in progress in ``gauge`` and its protocol ``alias`` while the block runs."""
    gauge.inc()
    alias.inc()
    try:
        yield
    finally:
        gauge.dec()
        alias.dec()


class TokenTimer:
    """Times a generation's steps into the token-latency and time-to-first-token histograms."""

    def __init__(self) -> None:
        self._started = self._last = time.perf_counter()
        self._steps = 0

    def step(self) -> None:
        """A step of generation has just produced its tokens."""
        now = time.perf_counter()
        TOKEN_LATENCY.observe(now - self._last)
        if self._steps == 0:
            TIME_TO_FIRST_TOKEN.observe(now - self._started)
        self._steps += 1
        self._last = now

    @property
    def elapsed(self) -> float:
        """Seconds since the generation started."""
        return time.perf_counter() - self._started
