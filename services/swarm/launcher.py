"""Start and stop a private Petals swarm on loopback.

A swarm is N Petals servers (``services.swarm.serve``, Petals' ``run_server`` with small tensors
sent by value), each serving a block range of one model; it may hold several models
(``SwarmModel``: a directory, a DHT prefix, one block range per server), as the public swarm
does: one DHT, each model's blocks announced under its own prefix. The first server creates the
swarm (``--new_swarm``); the others, of whichever model, join it through the first server's
multiaddr. Readiness comes from the servers themselves: each one prints its multiaddr when its
DHT node is up and ``Started`` once its blocks are loaded and announced.

Every server runs in its own process group (the server forks workers and a p2pd daemon), so
``stop()`` ends everything it started by process-group id, and nothing else; and each group
dies with the process that started it, even SIGKILLed (services/common/processes/lifeline.py).

CLI (used by ``make run`` through deploy/run_local.py, handy on its own too):
``python -m services.swarm.launcher --blocks 0:2 2:4`` runs until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from services.common.processes.cpus import available_cpus
from services.common.processes.lifeline import kill_group, spawn
from services.swarm.batching_metrics import PORT_ENV as METRICS_PORT_ENV

_MULTIADDR = re.compile(r"Running a server on \['(?P<addr>/ip4/[^']+/p2p/\w+)'")
_STARTED = re.compile(r"\[INFO\] Started\s*$")
# A Petals server is several processes (connection-handler forks, the runtime, p2pd), each of which
# would start torch with one intra-op thread per core: under load they spin against each other.
# One thread each cut the swarm's CPU per token from 95-145 ms to 12-15 ms (docs/deploying.md, Threads and dtype).
SERVER_TORCH_THREADS = 1
PETALS_NUM_HANDLERS = 8  # Petals' own default of --num_handlers, sized for a big machine


def handlers_per_server(servers: int, cpus: int | None = None) -> int:
    """``--num_handlers`` of each of ``servers`` Petals servers sharing this machine: one
    connection-handler process per CPU each server gets (``cpus`` defaults to ``available_cpus()``),
    never more than Petals' own default.

    Handler processes beyond the CPUs only add context switches, and a session's pushed inputs that
    land on another handler cross a process queue; on 2 cores, one handler per server instead of 8
    cut the swarm's CPU per token by 10-12 % (docs/deploying.md, Threads and dtype; bench/server_handlers.py).
    More than 8 was never measured, so a big machine keeps Petals' 8.
    """
    return max(1, min(PETALS_NUM_HANDLERS, (cpus or available_cpus()) // max(1, servers)))


class SwarmError(RuntimeError):
    """A server of the swarm failed to start or died during start-up."""


def pick_free_port(host: str = "127.0.0.1") -> int:
    """Ask the OS for a TCP port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_command(
    model: str,
    *,
    block_indices: str,
    dht_prefix: str,
    host: str,
    port: int,
    identity_path: Path,
    initial_peers: Sequence[str] = (),
    torch_dtype: str = "float32",
    device: str = "cpu",
    attn_cache_tokens: int = 32768,
    num_handlers: int | None = None,
) -> list[str]:
    """The argv of one Petals server; a new swarm when ``initial_peers`` is empty.

    ``attn_cache_tokens`` is the attention cache the server shares among all sessions (Petals
    defaults to 4096 tokens: four 1024-token chat sessions would fill it). Without
    ``num_handlers``, services/swarm/serve.py sizes the handlers to the CPUs the server gets.
    """
    swarm = ["--initial_peers", *initial_peers] if initial_peers else ["--new_swarm"]
    handlers = [] if num_handlers is None else ["--num_handlers", str(num_handlers)]
    return [
        sys.executable, "-m", "services.swarm.serve", model,
        "--dht_prefix", dht_prefix,
        "--host_maddrs", f"/ip4/{host}/tcp/{port}",
        "--block_indices", block_indices,
        "--throughput", "1",
        "--attn_cache_tokens", str(attn_cache_tokens),
        "--torch_dtype", torch_dtype,
        "--device", device,
        "--skip_reachability_check",
        "--identity_path", str(identity_path),
        *handlers,
        *swarm,
    ]  # fmt: skip


@dataclass
class SwarmServer:
    """One running Petals server process and what its log has told us so far."""

    name: str
    process: subprocess.Popen
    log_path: Path
    multiaddr: str | None = None
    metrics_base_url: str | None = None  # its batching metrics at <this>/metrics (PrivateSwarm(..., metrics=True))
    started: threading.Event = field(default_factory=threading.Event)
    terminated: bool = False

    def follow_log(self, stream: IO[str]) -> None:
        """Copy the server's output into its log file, noting readiness lines."""
        with open(self.log_path, "a", encoding="utf-8") as log:
            for line in stream:
                log.write(line)
                log.flush()
                if self.multiaddr is None and (match := _MULTIADDR.search(line)):
                    self.multiaddr = match["addr"]
                if _STARTED.search(line):
                    self.started.set()

    def wait_until(self, condition, what: str, deadline: float) -> None:
        """Wait for ``condition()``; fail fast if the server exits or time runs out."""
        while not condition():
            if self.process.poll() is not None:
                raise SwarmError(
                    f"{self.name} exited with code {self.process.returncode} before {what}; see {self.log_path}"
                )
            if time.monotonic() > deadline:
                raise SwarmError(f"{self.name} did not reach '{what}' in time; see {self.log_path}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the server's process group at once (a crash, for fault tests)."""
        kill_group(self.process.pid)
        self.process.wait(10)

    def terminate(self) -> None:
        """SIGTERM the server's main process: Petals' graceful shutdown (services/swarm/serve.py), which
        announces its blocks offline through its DHT daemon, then stops its handler processes and the
        daemon. Only the main process, as Kubernetes signals a container's PID 1: a SIGTERM to the whole
        group kills the daemon and the handlers under it, so nothing is announced and the server hangs
        until SIGKILL (measured: 30 s and no offline announcement, against 5 s and one)."""
        self.terminated = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGTERM)

    def stop(self, timeout: float) -> None:
        """SIGTERM the server (unless ``terminate`` did), SIGKILL its process group if it lingers."""
        if self.process.poll() is None and not self.terminated:
            self.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5.0)
        kill_group(self.process.pid)  # no process of the group (workers, p2pd) outlives the server


@dataclass(frozen=True)
class SwarmModel:
    """One model of a swarm: its directory, its DHT prefix, and one block range per server."""

    model_dir: Path
    block_ranges: tuple[str, ...]
    dht_prefix: str = "petals-chat"

    def __post_init__(self) -> None:
        if not self.block_ranges:
            raise ValueError(f"model {self.dht_prefix!r} needs at least one server (one block range)")


class PrivateSwarm:
    """A private Petals swarm on loopback; use as a context manager or call start/stop.

    ``PrivateSwarm(model_dir, block_ranges, work_dir, dht_prefix=...)`` serves one model;
    ``PrivateSwarm.of_models([SwarmModel(...), ...], work_dir)`` several, in one DHT. Servers are
    numbered across all models, in order (``server-N.log``, ``server-N.id`` in ``work_dir``).
    """

    def __init__(
        self,
        model_dir: Path,
        block_ranges: Sequence[str],
        work_dir: Path,
        *,
        dht_prefix: str = "petals-chat",
        host: str = "127.0.0.1",
        ports: Sequence[int] | None = None,
        torch_threads: int | None = SERVER_TORCH_THREADS,  # None: torch's default (one per core)
        more_models: Sequence[SwarmModel] = (),
        num_handlers: int | None = None,  # None: handlers_per_server of this swarm's servers
        env: Mapping[str, str] | None = None,  # more environment for every server (e.g. SWARM_BATCHING)
        metrics: bool = False,  # each server serves its batching metrics on a free port (SwarmServer.metrics_base_url)
    ) -> None:
        if not block_ranges:
            raise ValueError("a swarm needs at least one server (one block range)")
        self.models = [SwarmModel(Path(model_dir), tuple(block_ranges), dht_prefix), *more_models]
        prefixes = [model.dht_prefix for model in self.models]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError(f"each model of a swarm needs its own DHT prefix, got {prefixes}")
        # One entry per server, in start order: (its model, its block range).
        self.plan = [(model, blocks) for model in self.models for blocks in model.block_ranges]
        self.work_dir = Path(work_dir)
        self.host = host
        self.ports = list(ports) if ports else [pick_free_port(host) for _ in self.plan]
        if len(self.ports) != len(self.plan):
            raise ValueError(f"{len(self.plan)} servers but {len(self.ports)} ports")
        self.torch_threads = torch_threads
        self.num_handlers = num_handlers or handlers_per_server(len(self.plan))
        self.env = dict(env or {})
        self.metrics = metrics
        self.servers: list[SwarmServer] = []

    @classmethod
    def of_models(cls, models: Sequence[SwarmModel], work_dir: Path, **options) -> PrivateSwarm:
        """A swarm of several models in one DHT; ``options`` as for the constructor (``ports``: one
        per server, all models' servers in order)."""
        if not models:
            raise ValueError("a swarm needs at least one model")
        first, *others = models
        return cls(first.model_dir, first.block_ranges, work_dir, dht_prefix=first.dht_prefix, more_models=others,
                   **options)  # fmt: skip

    @property
    def model_dir(self) -> Path:
        """The first model's directory (the only one of a one-model swarm)."""
        return self.models[0].model_dir

    @property
    def dht_prefix(self) -> str:
        """The first model's DHT prefix (the only one of a one-model swarm)."""
        return self.models[0].dht_prefix

    @property
    def block_ranges(self) -> list[str]:
        """Every server's block range, in start order."""
        return [blocks for _, blocks in self.plan]

    @property
    def initial_peers(self) -> list[str]:
        """Multiaddrs a client (or another server) uses to join this swarm."""
        return [server.multiaddr for server in self.servers if server.multiaddr]

    def start(self, timeout: float = 180.0) -> PrivateSwarm:
        """Start every server and return once all of them have announced their blocks."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        try:
            for index in range(len(self.plan)):
                server = self._spawn(index)
                if index == 0:
                    server.wait_until(lambda s=server: s.multiaddr is not None, "its multiaddr", deadline)
            for server in self.servers:
                server.wait_until(server.started.is_set, "Started", deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def add_server(self, blocks: str, timeout: float = 180.0, model: SwarmModel | None = None) -> SwarmServer:
        """Start one more server in this swarm (of ``model``, default the first); returns once it
        serves its blocks."""
        self.plan.append((model or self.models[0], blocks))
        self.ports.append(pick_free_port(self.host))
        return self.restart(len(self.plan) - 1, timeout)

    def restart(self, index: int, timeout: float = 180.0) -> SwarmServer:
        """(Re)start server ``index`` with its identity and port, so its multiaddr is unchanged."""
        self.servers = [server for server in self.servers if server.process.poll() is None]
        server = self._spawn(index)
        server.wait_until(server.started.is_set, "Started", time.monotonic() + timeout)
        return server

    def _spawn(self, index: int) -> SwarmServer:
        model, blocks = self.plan[index]
        command = server_command(
            str(model.model_dir),
            block_indices=blocks,
            dht_prefix=model.dht_prefix,
            host=self.host,
            port=self.ports[index],
            identity_path=self.work_dir / f"server-{index}.id",
            initial_peers=self.initial_peers,  # the servers running now
            num_handlers=self.num_handlers,
        )
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **self.env}
        if self.torch_threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.torch_threads)
        metrics_base_url = None
        if self.metrics:
            env[METRICS_PORT_ENV] = str(metrics_port := pick_free_port(self.host))
            metrics_base_url = f"http://{self.host}:{metrics_port}"
        process = spawn(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
        )
        what = f"blocks {blocks}" if len(self.models) == 1 else f"{model.dht_prefix} blocks {blocks}"
        server = SwarmServer(f"petals server {index} ({what})", process, self.work_dir / f"server-{index}.log",
                             metrics_base_url=metrics_base_url)  # fmt: skip
        threading.Thread(target=server.follow_log, args=(process.stdout,), daemon=True).start()
        self.servers.append(server)
        return server

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every server this swarm started, all shutting down at once, within ``timeout`` in all."""
        for server in self.servers:
            if server.process.poll() is None:
                server.terminate()
        deadline = time.monotonic() + timeout
        for server in reversed(self.servers):
            server.stop(max(0.1, deadline - time.monotonic()))
        self.servers.clear()

    def __enter__(self) -> PrivateSwarm:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """Run a private swarm in the foreground until interrupted."""
    from services.swarm.tiny_bloom import ensure_tiny_bloom

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="model directory (default: the offline tiny BLOOM)")
    parser.add_argument("--blocks", nargs="+", default=["0:2", "2:4"], help="one block range per server")
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/swarm"))
    parser.add_argument("--dht-prefix", default="petals-chat")
    args = parser.parse_args(argv)
    swarm = PrivateSwarm(args.model_dir or ensure_tiny_bloom(), args.blocks, args.work_dir, dht_prefix=args.dht_prefix)
    with swarm:
        print("swarm ready; initial peers:", *swarm.initial_peers, sep="\n  ", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
