"""Settings are validated at start-up with one clear message."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from deploy.local_stack import REPO_ROOT
from services.common.startup.config import ConfigError, Env
from services.inference.model import servers_max_length
from services.inference.settings import InferenceSettings

BASE = {"MODEL": "/models/x"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "MODEL is required"),
        ({**BASE, "MAX_SESSIONS": "many"}, "MAX_SESSIONS must be an integer, got 'many'"),
        ({**BASE, "MAX_SESSIONS": "0"}, "MAX_SESSIONS must be >= 1"),
        ({**BASE, "SESSION_TTL_SECONDS": "inf"}, "SESSION_TTL_SECONDS must be a finite number"),
        ({**BASE, "TORCH_DTYPE": "int3"}, "TORCH_DTYPE must be one of float32, bfloat16, float16, auto"),
        ({**BASE, "DEBUG_TRACEBACKS": "perhaps"}, "DEBUG_TRACEBACKS must be a boolean"),
        ({**BASE, "REPLICA_HEAD_BATCHING": "sometimes"}, "REPLICA_HEAD_BATCHING must be a boolean"),
        ({**BASE, "REPLICA_STEP_BATCH_SESSIONS": "0"}, "REPLICA_STEP_BATCH_SESSIONS must be >= 1"),
        ({**BASE, "REPLICA_ID": "bad id!"}, "REPLICA_ID must be"),
        ({**BASE, "DEVICE": "gpu"}, "DEVICE must be cpu, cuda or cuda:N"),
        ({**BASE, "BIND": "8000"}, "BIND must be HOST:PORT"),
        ({**BASE, "MAX_SESSIONLESS_REQUESTS": "0"}, "MAX_SESSIONLESS_REQUESTS must be >= 1"),
        ({**BASE, "MODEL_MAX_LENGTH": "-1"}, "MODEL_MAX_LENGTH must be >= 0"),
        ({**BASE, "SWARM_STATE_REFRESH_SECONDS": "0"}, "SWARM_STATE_REFRESH_SECONDS must be >= 0.5"),
        ({**BASE, "SWARM_STATE_MAX_SERVERS": "5000"}, "SWARM_STATE_MAX_SERVERS must be <= 1000"),
        ({**BASE, "SWARM_STATE_MIN_REDUNDANCY": "0"}, "SWARM_STATE_MIN_REDUNDANCY must be >= 1"),
        ({**BASE, "SWARM_STATE_MIN_CACHE_TOKENS": "lots"}, "SWARM_STATE_MIN_CACHE_TOKENS must be an integer"),
    ],
)
def test_bad_settings_are_rejected_with_a_clear_message(env, message):
    with pytest.raises(ConfigError, match=message):
        InferenceSettings.from_env(Env(env))


def test_defaults():
    settings = InferenceSettings.from_env(Env({**BASE, "INITIAL_PEERS": "/ip4/a, /ip4/b", "REPLICA_ID": "inference-1"}))
    assert settings.initial_peers == ("/ip4/a", "/ip4/b")
    assert settings.session_ttl_s == 300 and settings.max_sessions == 50
    assert settings.limits.max_length == 2048 and settings.replica_id == "inference-1"
    assert settings.max_sessionless_requests == 16 and settings.model_max_length is None  # None: from the model
    assert (settings.swarm_state_refresh_s, settings.swarm_state_max_servers) == (30, 100)
    assert (settings.swarm_thresholds.min_redundancy, settings.swarm_thresholds.min_cache_tokens) == (1, 1024)
    assert settings.head_batching and settings.step_batching and settings.step_batch_sessions == 16


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"num_key_value_groups": 1}, 2048),  # BLOOM: no context length, Petals' server default
        ({"num_key_value_groups": 3, "max_position_embeddings": 8192}, 8192),  # SmolLM2
        ({"num_key_value_groups": 1, "max_position_embeddings": 1024}, 1024),  # a shorter context
        ({"num_key_value_groups": 8, "max_position_embeddings": 131072}, 8192),  # a longer one: the servers'
    ],
)
def test_the_servers_max_length_defaults_from_the_model(config, expected):
    assert servers_max_length(SimpleNamespace(**config)) == expected


@pytest.mark.parametrize(
    ("service", "env", "message"),
    [
        ("inference", {"MODEL": "x", "MAX_SESSIONS": "-1"}, "MAX_SESSIONS must be >= 1, got -1"),
        ("gateway", {}, "INFERENCE_REPLICAS or INFERENCE_DISCOVERY is required"),
        (
            "gateway",
            {"INFERENCE_REPLICAS": "inference-0=ftp://x"},
            "INFERENCE_REPLICAS entry must be ID=http://HOST:PORT",
        ),
        ("ui", {"API_BASE_URL": "javascript:alert(1)"}, "API_BASE_URL must be empty"),
        ("ui", {"GUNICORN_WORKERS": "0"}, "GUNICORN_WORKERS must be >= 1"),
    ],
)
def test_gunicorn_refuses_to_start_with_a_bad_setting(service, env, message):
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--config", f"services/{service}/gunicorn.conf.py", "--check-config"],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"{service}: configuration error: {message}" in result.stderr
