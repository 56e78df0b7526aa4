"""The local stack's composition, without starting anything: a swarm of several models, the runner's settings."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from deploy.local_stack import SMOLLM2, TINY_BLOOM, LocalStack, handover_env, write_discovery_file
from deploy.run_local import _models
from services.common.api.discovery import Discovery, FileEntry
from services.common.startup.config import ConfigError, Env
from services.swarm import launcher
from services.swarm.launcher import PrivateSwarm, SwarmModel, handlers_per_server, server_command
from services.swarm.serve import with_sized_handlers


def test_a_swarm_of_several_models_numbers_their_servers_in_order(tmp_path: Path):
    smol = SwarmModel(Path("/m/smol"), ("0:15", "15:30"), "prefix-smol")
    bloom = SwarmModel(Path("/m/bloom"), ("0:2", "2:4"), "prefix-bloom")
    swarm = PrivateSwarm.of_models([smol, bloom], tmp_path, ports=[1001, 1002, 1003, 1004])
    assert swarm.plan == [(smol, "0:15"), (smol, "15:30"), (bloom, "0:2"), (bloom, "2:4")]
    assert swarm.block_ranges == ["0:15", "15:30", "0:2", "2:4"] and swarm.ports == [1001, 1002, 1003, 1004]
    assert swarm.model_dir == Path("/m/smol") and swarm.dht_prefix == "prefix-smol"  # the first model's
    assert swarm.initial_peers == [] and swarm.servers == []  # nothing started


def test_a_one_model_swarm_keeps_its_constructor(tmp_path: Path):
    swarm = PrivateSwarm(Path("/m/bloom"), ["0:2", "2:4"], tmp_path, dht_prefix="p")
    assert swarm.models == [SwarmModel(Path("/m/bloom"), ("0:2", "2:4"), "p")]
    assert swarm.block_ranges == ["0:2", "2:4"] and len(swarm.ports) == 2


@pytest.mark.parametrize(
    ("servers", "cpus", "handlers"), [(2, 2, 1), (1, 2, 2), (4, 2, 1), (2, 16, 8), (3, 8, 2), (1, 64, 8), (2, 64, 8)]
)
def test_each_server_gets_one_connection_handler_per_cpu_it_gets(servers: int, cpus: int, handlers: int):
    assert handlers_per_server(servers, cpus) == handlers


def test_a_server_run_by_hand_gets_handlers_for_its_cpus_unless_given_some():
    """services/swarm/serve.py, the swarm image's entry point: --num_handlers added only where absent."""
    assert with_sized_handlers(["/m", "--new_swarm"], cpus=2) == ["/m", "--new_swarm", "--num_handlers", "2"]
    assert with_sized_handlers(["/m"], cpus=64) == ["/m", "--num_handlers", "8"]  # at most Petals' default
    for given in (["/m", "--num_handlers", "3"], ["/m", "--num_handlers=3"]):
        assert with_sized_handlers(given, cpus=2) == given


def test_the_swarm_sizes_its_servers_handlers_from_the_machines_cpus(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(launcher, "available_cpus", lambda: 4)
    assert PrivateSwarm(Path("/m"), ["0:2", "2:4"], tmp_path).num_handlers == 2
    assert PrivateSwarm(Path("/m"), ["0:1", "1:2", "2:3", "3:4", "4:5"], tmp_path).num_handlers == 1
    assert PrivateSwarm(Path("/m"), ["0:4"], tmp_path, num_handlers=8).num_handlers == 8
    where = {"block_indices": "0:4", "dht_prefix": "p", "host": "127.0.0.1", "port": 1, "identity_path": tmp_path}
    assert "--num_handlers" not in server_command("/m", **where)  # left to services/swarm/serve.py
    command = server_command("/m", **where, num_handlers=3)
    assert command[command.index("--num_handlers") + 1] == "3"


@pytest.mark.parametrize(
    ("models", "options", "message"),
    [
        ([], {}, "at least one model"),
        ([SwarmModel(Path("/a"), ("0:2",), "p"), SwarmModel(Path("/b"), ("0:2",), "p")], {}, "its own DHT prefix"),
        ([SwarmModel(Path("/a"), ("0:2", "2:4"), "p")], {"ports": [1001]}, "2 servers but 1 ports"),
    ],
)
def test_bad_swarms_are_refused(tmp_path: Path, models, options, message):
    with pytest.raises(ValueError, match=message):
        PrivateSwarm.of_models(models, tmp_path, **options)
    with pytest.raises(ValueError, match="at least one server"):
        SwarmModel(Path("/a"), (), "p")


def test_the_runner_serves_smollm2_first_then_tiny_bloom_by_default():
    models = _models(Env({}))
    assert [model.name for model in models] == ["smollm2-135m-instruct", "tiny-bloom"]
    assert models == (SMOLLM2, TINY_BLOOM) and SMOLLM2.block_ranges == ("0:15", "15:30")
    assert len({model.dht_prefix for model in models}) == 2


def test_the_runners_models_and_their_block_ranges_are_settings():
    env = Env({"LOCAL_MODELS": "tiny-bloom", "LOCAL_SWARM_BLOCKS_TINY_BLOOM": "0:4"})
    (model,) = _models(env)
    assert model.name == "tiny-bloom" and model.block_ranges == ("0:4",)
    env = Env({"LOCAL_SWARM_BLOCKS_SMOLLM2": "0:10,10:20 20:30"})
    assert _models(env)[0].block_ranges == ("0:10", "10:20", "20:30")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LOCAL_MODELS": "gpt-5"}, "LOCAL_MODELS must list distinct models of smollm2-135m-instruct, tiny-bloom"),
        ({"LOCAL_MODELS": "tiny-bloom tiny-bloom"}, "LOCAL_MODELS must list distinct models"),
        ({"LOCAL_SWARM_BLOCKS_SMOLLM2": "all"}, "LOCAL_SWARM_BLOCKS_SMOLLM2 must be block ranges like 0:2 2:4"),
        ({"LOCAL_SWARM_BLOCKS": "0:2 2:4"}, "LOCAL_SWARM_BLOCKS is replaced by one setting per model"),
    ],
)
def test_bad_runner_settings_are_one_clear_line(env, message):
    with pytest.raises(ConfigError, match=message):
        _models(Env(env))


class _Service:
    """A service of the stack as ``restart_stopped`` sees it: a name, a process, ``start``."""

    def __init__(self, name: str, exited: bool) -> None:
        command = ["true"] if exited else ["sleep", "30"]
        self.name, self.process = name, subprocess.Popen(command, start_new_session=True)
        self.base_url = f"http://127.0.0.1:{5010 + len(name)}"
        if exited:
            self.process.wait()
        self.starts = 0

    def start(self) -> None:
        self.starts += 1


def test_the_runner_starts_a_stopped_inference_replica_again_and_nothing_else(tmp_path: Path):
    stack = LocalStack.__new__(LocalStack)  # no swarm, no models: only its services
    stack.discovery_file = tmp_path / "inference-replicas.txt"
    stopped, running = _Service("inference-tiny-bloom-1", True), _Service("inference-tiny-bloom-0", False)
    gateway = _Service("gateway", True)
    stack.services = [stopped, running, gateway]
    try:
        assert stack.restart_stopped() == ["inference-tiny-bloom-1"]
        assert (stopped.starts, running.starts, gateway.starts) == (1, 0, 0)
        # the discovery file lists the replicas whose process runs (this fake start runs none)
        assert stack.discovery_file.read_text().splitlines()[1:] == ["inference-tiny-bloom-0=http://127.0.0.1:5032"]
    finally:
        running.process.kill()
        running.process.wait()


def test_the_replicas_find_their_peers_in_the_discovery_file_with_one_token(tmp_path: Path):
    path = tmp_path / "inference-replicas.txt"
    write_discovery_file(path, {"inference-m-0": "http://127.0.0.1:5010", "inference-m-1": "http://127.0.0.1:5011"})
    assert handover_env(path, "t" * 32) == {"INFERENCE_DISCOVERY": f"file://{path}", "HANDOVER_TOKEN": "t" * 32}
    found = Discovery((FileEntry(path),)).find()
    assert [item.url for item in found] == ["http://127.0.0.1:5010", "http://127.0.0.1:5011"]
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary file left behind"
