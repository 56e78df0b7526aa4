"""INFERENCE_DISCOVERY: parsing (one-line errors), resolution with an injected resolver and clock, and
the gateway's dynamic replica set (no I/O)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from services.common.api.discovery import Discovery, DnsEntry, FileEntry, Found, Rediscovery, parse_discovery
from services.common.chat.formats import HUMAN_AI
from services.common.chat.model_card import GenerationDefaults, ModelCard
from services.common.startup.config import ConfigError, Env
from services.common.web.errors import ModelStarting, SessionNotFound
from services.gateway.metrics import REQUESTS_WITHOUT_REPLICA
from services.gateway.poller import update
from services.gateway.replicas import Decision, ReplicaSet
from services.gateway.settings import GatewaySettings

BLOOM = ModelCard("tiny-bloom", "The seed's family.", HUMAN_AI, GenerationDefaults(), 2048)


def test_entries_parse_into_dns_and_file_sources():
    env = Env({"INFERENCE_DISCOVERY": "tiny-bloom=dns://inference-tiny-bloom:8000 dns://x.svc:80 file:///run/r.txt",
               "INFERENCE_DISCOVERY_INTERVAL_SECONDS": "2"})  # fmt: skip
    discovery = parse_discovery(env)
    assert discovery.entries == (DnsEntry("inference-tiny-bloom", 8000, "tiny-bloom"), DnsEntry("x.svc", 80),
                                 FileEntry(Path("/run/r.txt")))  # fmt: skip
    assert discovery.interval_s == 2.0 and discovery.models() == ("tiny-bloom",)
    assert not parse_discovery(Env({})) and parse_discovery(Env({})).interval_s == 5.0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"INFERENCE_DISCOVERY": "http://x:80"}, r"entries are \[MODEL=\]dns://HOST:PORT or file://ABSOLUTE_PATH"),
        ({"INFERENCE_DISCOVERY": "dns://x"}, "a dns:// entry is dns://HOST:PORT"),
        ({"INFERENCE_DISCOVERY": "dns://x:70000"}, "a dns:// entry is dns://HOST:PORT"),
        ({"INFERENCE_DISCOVERY": "dns://-x:80"}, "a dns:// entry is dns://HOST:PORT"),
        ({"INFERENCE_DISCOVERY": "bad!model=dns://x:80"}, "MODEL must be a model name"),
        ({"INFERENCE_DISCOVERY": "m=file:///r.txt"}, "MODEL= goes with dns:// entries only"),
        ({"INFERENCE_DISCOVERY": "file://r.txt"}, "needs an absolute path"),
        ({"INFERENCE_DISCOVERY": "dns://x:80", "INFERENCE_DISCOVERY_INTERVAL_SECONDS": "0"}, r">= 0.1"),
        ({}, "INFERENCE_REPLICAS or INFERENCE_DISCOVERY is required"),
    ],
)
def test_bad_discovery_settings_are_one_clear_line(env, message):
    with pytest.raises(ConfigError, match=message) as error:
        GatewaySettings.from_env(Env(env))
    assert "\n" not in str(error.value)


def test_the_gateway_takes_discovery_alone_and_a_cold_start_retry():
    settings = GatewaySettings.from_env(Env({"INFERENCE_DISCOVERY": "m=dns://x:80",
                                             "INFERENCE_COLD_START_RETRY_SECONDS": "30"}))  # fmt: skip
    assert settings.replicas == {} and settings.discovery.models() == ("m",) and settings.cold_start_retry_s == 30


def test_every_address_a_name_resolves_to_is_a_replica_ipv6_in_brackets():
    asked = []

    def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        if host == "gone":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return ["10.0.0.7", "fd00::3"]

    discovery = Discovery((DnsEntry("inference-m", 8000, "m"), DnsEntry("gone", 8000), DnsEntry("inference-m", 8000)))
    assert discovery.find(resolve) == [Found("http://10.0.0.7:8000", "m"), Found("http://[fd00::3]:8000", "m")]
    assert asked == [("inference-m", 8000), ("gone", 8000), ("inference-m", 8000)]


def test_a_discovery_file_gives_its_urls_and_nothing_while_missing_or_malformed(tmp_path: Path):
    path = tmp_path / "replicas.txt"
    entry = Discovery((FileEntry(path),))
    assert entry.find() == []
    path.write_text("# replicas\ninference-0=http://127.0.0.1:5010  # the first\n\ninference-1=http://127.0.0.1:5011\n")
    assert [found.url for found in entry.find()] == ["http://127.0.0.1:5010", "http://127.0.0.1:5011"]
    path.write_text("inference-0 http://127.0.0.1:5010\n")
    assert entry.find() == []


def test_discovery_is_due_every_interval_or_sooner_on_demand():
    now = [100.0]
    due = Rediscovery(5.0, clock=lambda: now[0])
    assert due.due()
    due.done()
    now[0] += 1.5
    assert not due.due() and due.due(soonest_s=1.0) and not due.due(soonest_s=2.0)
    now[0] += 3.5
    assert due.due()


def _readyz(name: str, *, ready: bool = True, stopping: bool = False) -> tuple[int, dict]:
    body = {"replica_id": name, "model_card": BLOOM.to_json(), "active_sessions": 0, "max_sessions": 4,
            "stopping": stopping, "detail": "ok"}  # fmt: skip
    return (200 if ready else 503), body


def test_a_discovered_replica_joins_moves_keeps_its_counts_and_is_forgotten():
    replicas = ReplicaSet({"static-0": "http://s:1"})
    replicas.discovered(["http://10.0.0.1:8000", "http://s:1"])
    assert replicas.pending() == ["http://10.0.0.1:8000"]
    replica = replicas.identified("inference-m-0", "http://10.0.0.1:8000")
    update(replica, *_readyz("inference-m-0"))
    assert replicas.pending() == [] and replica.ready
    assert replicas.least_loaded(Decision.NEW_SESSION, "tiny-bloom") == [replica]
    assert replicas.for_session("inference-m-0.abc") is replica and replicas.knows_holder("inference-m-0.abc")
    with replicas.in_flight(replica):
        replicas.discovered(["http://10.0.0.9:8000"])  # the pod restarted with a new address
        assert replicas.identified("inference-m-0", "http://10.0.0.9:8000") is replica
        assert replica.in_flight == 1 and replicas.forget_gone() == []
    assert replica.in_flight == 0 and replica.url == "http://10.0.0.9:8000"
    assert replicas.identified("static-0", "http://10.0.0.2:8000") is None, "a static replica's URL stays"
    replicas.discovered([])
    update(replica, *_readyz("inference-m-0", ready=False, stopping=True))
    assert replicas.forget_gone() == [], "kept while it hands its sessions over"
    update(replica, *_readyz("inference-m-0", ready=False))
    assert replicas.forget_gone() == [replica] and list(replicas.replicas) == ["static-0"], "static ones stay"
    assert not replicas.knows_holder("inference-m-0.abc")
    with pytest.raises(SessionNotFound):
        replicas.for_session("inference-m-0.abc")


def test_an_unready_discovered_replica_keeps_its_sessions():
    replicas = ReplicaSet({})
    replicas.discovered(["http://10.0.0.1:8000"])
    replica = replicas.identified("inference-m-0", "http://10.0.0.1:8000")
    update(replica, *_readyz("inference-m-0", ready=False))
    assert replica.answering and not replica.ready
    assert replicas.forget_gone() == [] and replicas.for_session("inference-m-0.abc") is replica


def test_a_discovered_model_with_no_replica_answering_is_starting_and_counted():
    replicas = ReplicaSet({}, discovered_models=("tiny-bloom", "other"), cold_start_retry_s=20)
    counted = REQUESTS_WITHOUT_REPLICA.labels(model="tiny-bloom")
    before = counted._value.get()
    assert replicas.default_model() == "tiny-bloom"
    for model in ("tiny-bloom", None):
        with pytest.raises(ModelStarting, match="'tiny-bloom' has no replica running yet") as error:
            replicas.resolve(model)
        assert error.value.headers["Retry-After"] == "20" and error.value.status.startswith("503")
    assert counted._value.get() == before + 2
    replicas.discovered(["http://10.0.0.1:8000"])
    update(replicas.identified("inference-m-0", "http://10.0.0.1:8000"), *_readyz("inference-m-0"))
    assert replicas.resolve(None) == BLOOM
