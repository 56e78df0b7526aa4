"""API keys: their configuration (one-line errors that never show a key), the constant-time lookup,
client addresses and the log redaction."""

from __future__ import annotations

import logging
import re

import pytest

from services.common.startup.config import ConfigError, Env, load_or_exit
from services.gateway import api_keys
from services.gateway.api_keys import ApiKeys, KeyRing
from services.gateway.auth import ClientIdentity, RedactKeys, client_address
from services.gateway.settings import GatewaySettings

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef"
CI = "ci-key-9f8e7d6c5b4a3210"
REPLICAS = {"INFERENCE_REPLICAS": "inference-0=http://127.0.0.1:1"}


def keys(**env: str) -> ApiKeys:
    return ApiKeys.from_env(Env(env))


def test_keys_are_off_by_default():
    assert not keys() and not GatewaySettings.from_env(Env(REPLICAS)).api_keys


def test_keys_from_the_environment_and_a_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# comment\n\nbob:{BOB}\n")
    loaded = keys(API_KEYS=f"alice:{ALICE}", API_KEYS_FILE=str(path))
    assert loaded.ids == ("alice", "bob")
    assert (loaded.identify(ALICE), loaded.identify(BOB), loaded.identify(ALICE[:-1]), loaded.identify("")) == (
        "alice", "bob", None, None
    )  # fmt: skip


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (ALICE, "API_KEYS entry 1 must be ID:KEY"),
        ("alice:short", "entry 1 (id 'alice'): the key must be 16-256 printable ASCII"),
        ("alice:" + "a" * 16, "entry 1 (id 'alice'): the key is too weak"),
        ("alice:" + "ab" * 32, "entry 1 (id 'alice'): the key is too weak"),
        ("alice:abcdefgabcdefgabcdefg", "entry 1 (id 'alice'): the key is too weak"),  # 7 distinct characters
        (f"alice:{ALICE} bob:" + "0123" * 8, "entry 2 (id 'bob'): the key is too weak"),
        (f"alice:{ALICE} alice:{BOB}", "entry 2: the id 'alice' is reserved or given twice"),
        (f"anonymous:{ALICE}", "the id 'anonymous' is reserved"),
        (f"a:{ALICE} b:{ALICE}", "entry 2 (id 'b'): the same key is given to another id"),
        (f"bad id:{ALICE}", "entry 1 must be ID:KEY"),
    ],
)
def test_bad_entries_are_one_line_errors_without_the_key(value, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        keys(API_KEYS=value)
    assert ALICE not in str(caught.value) and "short" not in str(caught.value).replace("'alice'", "")
    assert "\n" not in str(caught.value)


def test_a_weak_key_stops_the_gateway_at_start_with_one_line(capsys):
    env = Env({**REPLICAS, "API_KEYS": f"alice:{ALICE} bob:{'x' * 40}"})
    with pytest.raises(SystemExit) as caught:
        load_or_exit(lambda: GatewaySettings.from_env(env), "gateway")
    assert caught.value.code == 2
    assert capsys.readouterr().err == (
        "gateway: configuration error: API_KEYS entry 2 (id 'bob'): the key is too weak (under 8 distinct "
        "characters or too repetitive): use a random one, e.g. 'openssl rand -hex 16'\n"
    )


def test_unreadable_key_file(tmp_path):
    with pytest.raises(ConfigError, match=r"API_KEYS_FILE .* cannot be read"):
        keys(API_KEYS_FILE=str(tmp_path / "missing"))


def test_anonymous_rate_needs_keys():
    with pytest.raises(ConfigError, match="ANONYMOUS_RATE_LIMIT_PER_MINUTE needs API_KEYS"):
        GatewaySettings.from_env(Env({**REPLICAS, "ANONYMOUS_RATE_LIMIT_PER_MINUTE": "5"}))
    env = {**REPLICAS, "ANONYMOUS_RATE_LIMIT_PER_MINUTE": "5", "API_KEYS": f"alice:{ALICE}"}
    assert GatewaySettings.from_env(Env(env)).anonymous_rate_limit_per_minute == 5


def test_every_key_is_compared_in_constant_time(monkeypatch):
    compared = []

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return a == b

    monkeypatch.setattr(api_keys.hmac, "compare_digest", spy)
    loaded = keys(API_KEYS=f"alice:{ALICE} bob:{BOB}")
    assert loaded.identify(ALICE) == "alice"
    assert compared == [ALICE.encode(), BOB.encode()]  # no early exit on the match


class FakeRequest:
    def __init__(self, remote_addr: str, forwarded: str | None) -> None:
        self.remote_addr = remote_addr
        self._forwarded = forwarded

    def get_header(self, name: str) -> str | None:
        return self._forwarded if name == "X-Forwarded-For" else None


def trusted(value: str) -> tuple:
    return GatewaySettings.from_env(Env({**REPLICAS, "TRUSTED_PROXIES": value})).trusted_proxies


def test_client_address_trusts_only_the_entry_the_ingress_added():
    spoofed = FakeRequest("10.0.0.9", "1.2.3.4, 203.0.113.7")
    assert client_address(spoofed, trusted("10.0.0.0/8")) == "203.0.113.7"
    assert client_address(spoofed, ()) == "10.0.0.9"
    assert client_address(FakeRequest("10.0.0.9", "not an address"), trusted("10.0.0.0/8")) == "10.0.0.9"
    assert ClientIdentity("alice", "10.0.0.9").name == "key:alice"
    assert (ClientIdentity(None, "::1").name, ClientIdentity(None, "::1").label) == ("ip:::1", "anonymous")


def test_x_forwarded_for_is_honoured_only_from_a_trusted_proxy():
    """A pod outside TRUSTED_PROXIES (any pod could reach the gateway) cannot pick its address."""
    proxies = trusted("10.1.0.0/16, 192.168.7.7 fd00::/8")
    assert client_address(FakeRequest("10.1.2.3", "203.0.113.7"), proxies) == "203.0.113.7"
    assert client_address(FakeRequest("192.168.7.7", "203.0.113.7"), proxies) == "203.0.113.7"
    assert client_address(FakeRequest("::ffff:10.1.2.3", "203.0.113.7"), proxies) == "203.0.113.7"
    assert client_address(FakeRequest("fd00::5", "2001:db8::1"), proxies) == "2001:db8::1"
    for peer in ("10.2.0.1", "192.168.7.8", "203.0.113.9", "unknown"):
        assert client_address(FakeRequest(peer, "198.51.100.1"), proxies) == peer
    assert GatewaySettings.from_env(Env(REPLICAS)).trusted_proxies == ()  # by default no peer is a proxy


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TRUSTED_PROXIES": "10.0.0.0/33"}, "TRUSTED_PROXIES entries must be addresses or CIDRs, got '10.0.0.0/33'"),
        ({"TRUSTED_PROXIES": "ingress-nginx"}, "TRUSTED_PROXIES entries must be addresses or CIDRs"),
        ({"TRUST_PROXY_HEADERS": "1"}, "TRUST_PROXY_HEADERS is replaced by TRUSTED_PROXIES"),
    ],
)
def test_trusted_proxies_are_validated_at_start(env, message):
    with pytest.raises(ConfigError) as info:
        GatewaySettings.from_env(Env({**REPLICAS, **env}))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_query_keys_are_redacted_from_log_lines():
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]',
                               ("127.0.0.1:5", f"/api/v2/generate?api_key={ALICE}&x=1"), None)  # fmt: skip
    assert RedactKeys().filter(record)
    assert ALICE not in record.getMessage() and "api_key=[redacted]&x=1" in record.getMessage()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def rotate(path, text: str) -> None:
    """Replace the file as Kubernetes updates a mounted Secret: a new file renamed over the old."""
    new = path.with_name("new-keys")
    new.write_text(text)
    new.replace(path)


def ring_of(path, clock: Clock, listed: tuple[str, ...] = ()) -> KeyRing:
    return KeyRing(listed, str(path), reload_interval_s=30, clock=clock)


def test_a_rotated_key_file_is_read_again_once_the_interval_has_passed(tmp_path, caplog):
    path, clock = tmp_path / "keys", Clock()
    path.write_text(f"alice:{ALICE}\n")
    ring = ring_of(path, clock, listed=(f"ci:{CI}",))
    rotate(path, f"bob:{BOB}\n")
    clock.now = 29.0
    assert ring.identify(ALICE) == "alice" and ring.identify(BOB) is None  # not looked at yet
    clock.now = 30.0
    with caplog.at_level(logging.INFO, logger="services.gateway.api_keys"):
        assert (ring.identify(ALICE), ring.identify(BOB), ring.identify(CI)) == (None, "bob", "ci")
    assert "API keys reloaded from API_KEYS_FILE: ids ci, bob" in caplog.text and BOB not in caplog.text


@pytest.mark.parametrize(
    ("text", "logged"),
    [
        (f"bob:{BOB}\nbob:{ALICE}\n", "entry 2: the id 'bob' is reserved or given twice"),
        ("# every key removed\n", "API_KEYS_FILE lists no key; turning keys off takes a restart"),
    ],
)
def test_a_bad_new_key_file_leaves_the_keys_in_force(tmp_path, caplog, text, logged):
    path, clock = tmp_path / "keys", Clock()
    path.write_text(f"alice:{ALICE}\n")
    ring = ring_of(path, clock)
    rotate(path, text)
    clock.now = 30.0
    with caplog.at_level(logging.ERROR, logger="services.gateway.api_keys"):
        assert ring.identify(ALICE) == "alice" and ring
    assert logged in caplog.text and ALICE not in caplog.text and BOB not in caplog.text
    rotate(path, f"bob:{BOB}\n")  # mended: taken at the next look
    clock.now = 60.0
    assert (ring.identify(ALICE), ring.identify(BOB)) == (None, "bob")


def test_an_unchanged_key_file_is_not_read_again(tmp_path, monkeypatch):
    path, clock = tmp_path / "keys", Clock()
    path.write_text(f"alice:{ALICE}\n")
    ring = ring_of(path, clock)
    reads = []
    monkeypatch.setattr(api_keys, "_read_key_file", lambda p: reads.append(p) or [])
    clock.now = 300.0
    assert ring.identify(ALICE) == "alice" and reads == []


def test_a_reload_interval_of_zero_never_reads_the_file_again(tmp_path):
    path, clock = tmp_path / "keys", Clock()
    path.write_text(f"alice:{ALICE}\n")
    ring = KeyRing((), str(path), reload_interval_s=0, clock=clock)
    rotate(path, f"bob:{BOB}\n")
    clock.now = 3600.0
    assert (ring.identify(ALICE), ring.identify(BOB)) == ("alice", None)


def test_the_reload_interval_is_validated():
    with pytest.raises(ConfigError, match="API_KEYS_RELOAD_SECONDS"):
        GatewaySettings.from_env(Env({**REPLICAS, "API_KEYS_RELOAD_SECONDS": "-1"}))


@pytest.mark.parametrize(
    "line",
    [
        f"/api/v2/generate?api%5Fkey={ALICE}",
        f"/api/v2/generate?x=1&%61pi%5fkey={ALICE}&y=2",
        f"/api/v2/generate?API_KEY={ALICE}",
        f"/api/v2/generate?api%255Fkey={ALICE}",
        f"Sec-WebSocket-Protocol: petals-chat, bearer.{ALICE}",
        f"Authorization: Bearer {ALICE}",
    ],
)
def test_keys_are_redacted_from_log_lines_in_every_spelling(line):
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "%s", (line,), None)
    assert RedactKeys().filter(record)
    assert ALICE not in record.getMessage() and "[redacted]" in record.getMessage()


def test_other_query_fields_are_logged_as_they_are():
    line = "/api/v1/generate?max_new_tokens=3&inputs=api_key&key=1"
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "%s", (line,), None)
    assert RedactKeys().filter(record) and record.getMessage() == line
