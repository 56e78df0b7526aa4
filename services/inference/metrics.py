"""The inference service's Prometheus metrics (request metrics live in services.common.web.metrics)."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

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
