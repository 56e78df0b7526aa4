"""The inference service's settings, read from the environment (see docs/configuration.md)."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

from services.common.api.discovery import Discovery, parse_discovery
from services.common.api.params import MODEL_NAME_PATTERN, SESSION_ID_PATTERN, Limits
from services.common.api.replica_urls import parse_replica_urls
from services.common.api.swarm_state import SwarmThresholds
from services.common.chat.formats import ChatFormat
from services.common.chat.model_card import ModelCard
from services.common.p2p.swarm_identity import DERIVED, IdentityError, read_seed, resolve_multiaddr
from services.common.processes.cpus import available_cpus, cpu_has_native_bf16
from services.common.startup.config import ConfigError, Env, ServerSettings
from services.inference.chat_config import ChatSettings

DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass(frozen=True)
class InferenceSettings:
    """Everything the inference service reads from its environment."""

    server: ServerSettings
    model: str
    model_name: str
    model_description: str
    chat: ChatSettings
    initial_peers: tuple[str, ...]
    dht_prefix: str | None
    torch_dtype: str
    torch_threads: int
    head_batching: bool  # concurrent sessions' LM head products as one (head_batching.py)
    step_batching: bool  # concurrent sessions' steps to a server in one request (grouped_sessions.py)
    step_batch_sessions: int  # at most this many sessions' steps in one such request
    device: str
    replica_id: str
    session_ttl_s: float
    max_sessions: int
    max_sessions_per_client: int  # 0: no quota
    max_sessionless_requests: int  # requests without a session (each a Petals session of its own) at once
    model_max_length: int | None  # the most tokens the model's servers hold per session (None: from the model)
    reaper_interval_s: float
    swarm_max_retries: int
    swarm_request_timeout_s: float
    swarm_update_period_s: float
    readiness_interval_s: float
    swarm_state_refresh_s: float  # how often the swarm's state is read from the DHT
    swarm_state_max_servers: int  # servers listed at most in that state
    swarm_thresholds: SwarmThresholds  # when the swarm counts as degraded
    limits: Limits
    debug_tracebacks: bool
    handover_token: str  # empty: sessions are not handed over on a stop (closed, as before)
    peers: dict[str, str]  # the other replicas of this model (id -> URL) that may adopt sessions
    discovery: Discovery  # INFERENCE_DISCOVERY: more peers, found when a handover starts (empty: none)
    handover_linger_s: float  # after handing over, how long requests for moved sessions are redirected

    @classmethod
    def from_env(cls, env: Env | None = None) -> InferenceSettings:
        """Read and validate every setting; raises ConfigError with a clear message."""
        env = env or Env()
        replica_id = env.str("REPLICA_ID", socket.gethostname())
        if not SESSION_ID_PATTERN.match(replica_id) or len(replica_id) > 63:
            raise ConfigError(f"REPLICA_ID must be up to 63 letters, digits, '.', '_' or '-', got {replica_id!r}")
        device = env.str("DEVICE", "cpu")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
            raise ConfigError(f"DEVICE must be cpu, cuda or cuda:N, got {device!r}")
        model = env.str("MODEL", "")
        if not model:
            raise ConfigError("MODEL is required: a local model directory or a Hugging Face repo name")
        model_name = env.str("MODEL_NAME", "") or served_model_name(model)
        if not MODEL_NAME_PATTERN.match(model_name):
            raise ConfigError(f"MODEL_NAME must be 1-128 letters, digits or '._:/-', got {model_name!r}")
        limits = Limits.from_env(env)
        return cls(
            server=ServerSettings.from_env(env, bind="127.0.0.1:8000", threads=128, workers=None),
            model=model,
            model_name=model_name,
            model_description=env.str("MODEL_DESCRIPTION", ""),
            chat=ChatSettings.from_env(env, limits),
            initial_peers=resolve_initial_peers(env.list("INITIAL_PEERS"), env.str("SWARM_SEED_FILE", "")),
            dht_prefix=env.str("DHT_PREFIX", "") or None,
            torch_dtype=env.choice("TORCH_DTYPE", default_dtype(device), DTYPES),
            torch_threads=env.int("TORCH_THREADS", available_cpus(), minimum=1, maximum=1024),
            head_batching=env.bool("REPLICA_HEAD_BATCHING", True),
            step_batching=env.bool("REPLICA_STEP_BATCHING", True),
            step_batch_sessions=env.int("REPLICA_STEP_BATCH_SESSIONS", 16, minimum=1, maximum=1024),
            device=device,
            replica_id=replica_id,
            session_ttl_s=env.float("SESSION_TTL_SECONDS", 300.0, minimum=1.0),
            max_sessions=env.int("MAX_SESSIONS", 50, minimum=1),
            max_sessions_per_client=env.int("MAX_SESSIONS_PER_CLIENT", 0, minimum=0),
            max_sessionless_requests=env.int("MAX_SESSIONLESS_REQUESTS", 16, minimum=1),
            model_max_length=env.int("MODEL_MAX_LENGTH", 0, minimum=0, maximum=1_048_576) or None,
            reaper_interval_s=env.float("SESSION_REAPER_INTERVAL_SECONDS", 5.0, minimum=0.1),
            swarm_max_retries=env.int("SWARM_MAX_RETRIES", 4, minimum=1),
            swarm_request_timeout_s=env.float("SWARM_REQUEST_TIMEOUT_SECONDS", 60.0, minimum=1.0),
            swarm_update_period_s=env.float("SWARM_UPDATE_PERIOD_SECONDS", 30.0, minimum=1.0),
            readiness_interval_s=env.float("READINESS_INTERVAL_SECONDS", 5.0, minimum=0.5),
            swarm_state_refresh_s=env.float("SWARM_STATE_REFRESH_SECONDS", 30.0, minimum=0.5, maximum=3600.0),
            swarm_state_max_servers=env.int("SWARM_STATE_MAX_SERVERS", 100, minimum=1, maximum=1000),
            swarm_thresholds=SwarmThresholds(
                min_redundancy=env.int("SWARM_STATE_MIN_REDUNDANCY", 1, minimum=1, maximum=1000),
                min_cache_tokens=env.int("SWARM_STATE_MIN_CACHE_TOKENS", 1024, minimum=0, maximum=1 << 40),
            ),
            limits=limits,
            debug_tracebacks=env.bool("DEBUG_TRACEBACKS", False),
            handover_token=handover_token(env),
            peers=peers(env, replica_id),
            discovery=parse_discovery(env),
            handover_linger_s=env.float("HANDOVER_LINGER_SECONDS", 5.0, minimum=0.0, maximum=60.0),
        )

    def model_card(self, chat_format: ChatFormat, max_length: int | None = None) -> ModelCard:
        """The card this replica publishes for its model, once its chat format (and the most tokens a
        session may hold, by default MAX_LENGTH_LIMIT) is known."""
        chat, max_length = self.chat, max_length or self.limits.max_length
        return ModelCard(self.model_name, self.model_description, chat_format, chat.defaults, max_length, chat.template)


def peers(env: Env, replica_id: str) -> dict[str, str]:
    """INFERENCE_PEERS: the replicas of this model that may adopt its sessions (itself left out)."""
    listed = parse_replica_urls(env.list("INFERENCE_PEERS"), "INFERENCE_PEERS")
    return {name: url for name, url in listed.items() if name != replica_id}


def handover_token(env: Env) -> str:
    """HANDOVER_TOKEN, or the file HANDOVER_TOKEN_FILE names: the secret the replicas of a deployment
    share to hand sessions to each other."""
    token, path = env.str("HANDOVER_TOKEN", ""), env.str("HANDOVER_TOKEN_FILE", "")
    if token and path:
        raise ConfigError("set HANDOVER_TOKEN or HANDOVER_TOKEN_FILE, not both")
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as error:
            raise ConfigError(f"HANDOVER_TOKEN_FILE {path!r} cannot be read ({error.strerror})") from None
    if token and len(token) < 16:
        raise ConfigError("HANDOVER_TOKEN must be at least 16 characters (or empty: no handover)")
    return token


def default_dtype(device: str) -> str:
    """The fast dtype for the client-side layers: bfloat16 on a GPU or an AMX CPU, else float32.

    On an AMX Xeon the service's bfloat16 LM head of a BLOOM-176B-shaped model takes 0.27 s per
    token against 0.43 s in float32, in half the memory; on a CPU without native bfloat16 matrix
    units bfloat16 was not found faster (bench/lm_head.py).
    """
    return "bfloat16" if device != "cpu" or cpu_has_native_bf16() else "float32"


def resolve_initial_peers(peers: tuple[str, ...], seed_file: str) -> tuple[str, ...]:
    """INITIAL_PEERS with each ``/p2p/derived:<label>`` replaced by the peer id derived from SWARM_SEED_FILE.

    The chart's private swarm names its bootstrap servers this way (services/common/p2p/swarm_identity.py).
    """
    if not any(DERIVED in peer for peer in peers):
        return peers
    try:
        seed = read_seed(seed_file) if seed_file else None
        return tuple(resolve_multiaddr(peer, seed) for peer in peers)
    except IdentityError as error:
        raise ConfigError(f"INITIAL_PEERS: {error}") from None


def served_model_name(model: str) -> str:
    """The public name of ``MODEL``: a local directory's name, or the Hugging Face repo name."""
    path = Path(model)
    return path.name if path.is_dir() else model
