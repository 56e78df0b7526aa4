"""Every torch process the project starts gets the thread pool it was sized for, and every Petals
server the connection handlers it was sized for."""

from __future__ import annotations

from pathlib import Path

from services.common.cpus import available_cpus
from services.swarm.launcher import SERVER_TORCH_THREADS, handlers_per_server


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


def test_the_inference_worker_runs_torch_with_the_granted_cpus(inference):
    # what torch.get_num_threads() says in the worker, as it loads the model
    assert f"{available_cpus()} torch threads" in inference.log_path.read_text()
