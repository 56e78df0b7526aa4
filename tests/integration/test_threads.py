"""Every torch process the project starts gets the thread pool it was sized for, and every Petals
server the connection handlers it was sized for."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from services.common.processes.cpus import available_cpus
from services.common.processes.lifeline import spawn
from services.swarm.launcher import (
    SERVER_TORCH_THREADS,
    SwarmServer,
    handlers_per_server,
    pick_free_port,
    server_command,
)


def _group_environments(pgid: int) -> list[dict[str, str]]:
    """The environment each live process of a process group was started with (a fork shows its parent's)."""
    environments = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            raw = (stat.parent / "environ").read_bytes()
        except (OSError, IndexError):
            continue  # exited meanwhile
        items = raw.decode(errors="replace").split("\0")
        environments.append(dict(item.split("=", 1) for item in items if "=" in item))
    return environments


def test_every_process_of_every_swarm_server_has_one_torch_thread(swarm):
    for server in swarm.servers:
        environments = _group_environments(server.process.pid)
        assert len(environments) >= 3, "a Petals server runs handler forks and p2pd"
        assert {env.get("OMP_NUM_THREADS") for env in environments} == {str(SERVER_TORCH_THREADS)}


def _python_children(pid: int) -> list[int]:
    """The Python processes whose parent is ``pid`` (a Petals server's forks: its DHT and its handlers)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, fields = stat.read_text().split(" (", 1)[1].rsplit(")", 1)
        except (OSError, ValueError):
            continue
        if int(fields.split()[1]) == pid and name.startswith("python"):
            children.append(int(stat.parent.name))
    return children


def test_every_swarm_server_runs_one_connection_handler_per_cpu_it_gets(swarm):
    expected = handlers_per_server(len(swarm.servers))
    assert swarm.num_handlers == expected
    for server in swarm.servers:
        # the forks of the server's main process: its handlers and the DHT process (whose child is p2pd)
        assert len(_python_children(server.process.pid)) == expected + 1


def test_a_server_run_by_hand_on_one_cpu_runs_one_connection_handler(model_dir: Path, tmp_path: Path):
    """The swarm image's entry point without --num_handlers, as an operator may run it: pinned to
    one CPU, it runs one handler (Petals alone would fork 8)."""
    command = server_command(str(model_dir), block_indices="0:4", dht_prefix="by-hand", host="127.0.0.1",
                             port=pick_free_port(), identity_path=tmp_path / "server.id")  # fmt: skip
    assert "--num_handlers" not in command
    cpu = str(min(os.sched_getaffinity(0)))
    process = spawn(["taskset", "--cpu-list", cpu, *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    server = SwarmServer("petals server by hand", process, tmp_path / "server.log")
    threading.Thread(target=server.follow_log, args=(process.stdout,), daemon=True).start()
    try:
        server.wait_until(server.started.is_set, "Started", time.monotonic() + 180)
        assert "--num_handlers 1" in server.log_path.read_text()  # serve.py's logged command line
        assert len(_python_children(process.pid)) == 1 + 1  # one handler and the DHT process
    finally:
        server.stop(15)


def test_the_inference_worker_runs_torch_with_the_granted_cpus(inference):
    # what torch.get_num_threads() says in the worker, as it loads the model
    assert f"{available_cpus()} torch threads" in inference.log_path.read_text()
