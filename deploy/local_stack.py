"""The local all-in-one stack: a private swarm on loopback plus the services under gunicorn.

It serves several models (``LocalModel``; ``make run``: SmolLM2-135M-Instruct, the default, and
the tiny BLOOM) from one private swarm: each model's Petals servers under its own DHT prefix in
one DHT, and inference replicas per model behind one gateway.

The gateway and the replicas find the replicas in a discovery file (``INFERENCE_DISCOVERY=file://``,
services/common/api/discovery.py) that the stack rewrites whenever it starts or stops a replica.

Used by ``make run`` (deploy/run_local.py) and by the integration tests, so both exercise
the same processes the same way. Every process is started in its own process group and
stopped by that group's id: SIGTERM first (graceful: sessions are closed), SIGKILL after. Each
group also dies with the process that started it, even SIGKILLed (services/common/processes/lifeline.py).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.common.processes.lifeline import kill_group, spawn
from services.swarm.launcher import PrivateSwarm, SwarmModel, pick_free_port
from services.swarm.smollm2 import ensure_smollm2
from services.swarm.tiny_bloom import ensure_tiny_bloom

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STATE_DIR = REPO_ROOT / ".cache" / "local"


class StartupError(RuntimeError):
    """A process of the stack died or did not become ready in time."""


@dataclass
class ServiceProcess:
    """One service under gunicorn, in its own process group."""

    name: str
    config: str  # gunicorn config file, relative to the repository root
    env: dict[str, str]
    log_path: Path
    port: int
    host: str = "127.0.0.1"
    root: Path = REPO_ROOT  # the source tree it runs (a benchmark's baseline may run another)
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServiceProcess:
        """Start gunicorn with this service's config and environment."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its whole life
        env = {**os.environ, **self.env, "BIND": f"{self.host}:{self.port}", "PYTHONUNBUFFERED": "1"}
        self.process = spawn(
            [sys.executable, "-m", "gunicorn", "--config", self.config],
            cwd=self.root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return self

    def wait_ready(self, timeout: float = 120.0, path: str = "/readyz") -> None:
        """Poll ``path`` until it answers 200; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise StartupError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if http_status(self.base_url + path) == 200:
                return
            time.sleep(0.25)
        raise StartupError(f"{self.name} was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def start_ready(self, timeout: float = 120.0, path: str = "/readyz") -> ServiceProcess:
        """Start and wait until ready; a service that fails to get ready is stopped again."""
        self.start()
        try:
            self.wait_ready(timeout, path)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM gunicorn's master, SIGKILL the group after ``timeout``; returns the exit code.

        Only the master gets SIGTERM, as in Kubernetes (PID 1 of the container): the workers'
        own children (the Petals client's p2p daemon) must live until the workers have finished
        their requests and closed their sessions.
        """
        if self.process is None:
            return None
        for kill, sig, wait in ((os.kill, signal.SIGTERM, timeout), (os.killpg, signal.SIGKILL, 5.0)):
            if self.process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                kill(self.process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(wait)
        kill_group(self.process.pid)  # stragglers of the group
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        """The end of the service's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of a GET, or None if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return None


@dataclass(frozen=True)
class LocalModel:
    """A model of the local stack: its public name and card line, its DHT prefix, one block range
    per Petals server, and how to build (or find cached) its directory."""

    name: str  # the replicas' MODEL_NAME (GET /v1/models, the requests' model)
    description: str  # the replicas' MODEL_DESCRIPTION (under the chat page's picker)
    dht_prefix: str
    block_ranges: tuple[str, ...]
    build: Callable[[], Path] = field(repr=False, compare=False)
    setting: str = ""  # the local runner's setting of its block ranges (LOCAL_SWARM_BLOCKS_<KEY>)


SMOLLM2 = LocalModel(
    name="smollm2-135m-instruct",
    description="SmolLM2 135M Instruct: a small real chat model (Apache-2.0)",
    dht_prefix="petals-chat-smollm2",
    block_ranges=("0:15", "15:30"),
    build=ensure_smollm2,
    setting="LOCAL_SWARM_BLOCKS_SMOLLM2",
)
TINY_BLOOM = LocalModel(
    name="tiny-bloom",
    description="Tiny BLOOM: 4 random-weight blocks, gibberish by design (the exact-output tests' model)",
    dht_prefix="petals-chat",
    block_ranges=("0:2", "2:4"),
    build=ensure_tiny_bloom,
    setting="LOCAL_SWARM_BLOCKS_TINY_BLOOM",
)
LOCAL_MODELS = {model.name: model for model in (SMOLLM2, TINY_BLOOM)}  # what the local stack can serve
DEFAULT_LOCAL_MODELS = (SMOLLM2, TINY_BLOOM)  # what `make run` serves; the first is the default model


def inference_process(
    *,
    model_dir: Path,
    initial_peers: list[str],
    dht_prefix: str,
    port: int,
    log_path: Path,
    replica_id: str = "inference-0",
    extra_env: dict[str, str] | None = None,
) -> ServiceProcess:
    """An inference service on loopback, pointed at a private swarm."""
    env = {
        "MODEL": str(model_dir),
        "INITIAL_PEERS": " ".join(initial_peers),
        "DHT_PREFIX": dht_prefix,
        "REPLICA_ID": replica_id,
        "HF_HUB_OFFLINE": "1",
        **(extra_env or {}),
    }
    return ServiceProcess(replica_id, "services/inference/gunicorn.conf.py", env, log_path, port)


def write_discovery_file(path: Path, replicas: dict[str, str]) -> None:
    """Write the ``ID=URL`` lines of ``replicas`` to ``path`` atomically (write, then rename): a
    reader sees the old list or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text("# inference replicas (id=url), rewritten by deploy/local_stack.py\n" +
                         "".join(f"{name}={url}\n" for name, url in replicas.items()))  # fmt: skip
    os.replace(temporary, path)


def discovery_env(path: Path) -> dict[str, str]:
    """A gateway's or a replica's setting to find the replicas listed in the discovery file ``path``."""
    return {"INFERENCE_DISCOVERY": f"file://{path.resolve()}"}


def handover_env(discovery_file: Path, token: str) -> dict[str, str]:
    """A replica's settings to hand its sessions, on SIGTERM, to the replicas of its model that the
    discovery file lists."""
    return {**discovery_env(discovery_file), "HANDOVER_TOKEN": token}


def gateway_process(
    *,
    port: int,
    log_path: Path,
    replicas: dict[str, str] | None = None,
    discovery_file: Path | None = None,
    name: str = "gateway",
    extra_env: dict[str, str] | None = None,
    root: Path = REPO_ROOT,
) -> ServiceProcess:
    """A gateway on loopback, routing to the given inference replicas (id -> base URL) and those the
    discovery file lists, run from the source tree ``root``."""
    env = {"INFERENCE_REPLICAS": " ".join(f"{rid}={url}" for rid, url in (replicas or {}).items())}
    env.update(discovery_env(discovery_file) if discovery_file else {})
    return ServiceProcess(name, "services/gateway/gunicorn.conf.py", {**env, **(extra_env or {})}, log_path, port,
                          root=root)  # fmt: skip


def ui_process(*, port: int, log_path: Path, extra_env: dict[str, str] | None = None) -> ServiceProcess:
    """The ui service on loopback."""
    return ServiceProcess("ui", "services/ui/gunicorn.conf.py", dict(extra_env or {}), log_path, port)


class LocalStack:
    """Private swarm + inference replicas + gateway, started and stopped together.

    Every model of ``models`` gets its Petals servers (one per block range) in the one swarm and
    ``inference_replicas`` replicas (``inference-<model>-<n>``); the first model is the gateway's
    ``DEFAULT_MODEL``, so the chat page opens with it.
    """

    def __init__(
        self,
        *,
        public_port: int = 5000,
        models: Sequence[LocalModel] = DEFAULT_LOCAL_MODELS,
        inference_replicas: int = 1,
        state_dir: Path = DEFAULT_STATE_DIR,
    ) -> None:
        if not models:
            raise ValueError("the local stack needs at least one model")
        self.public_port = public_port
        self.models = list(models)
        self.inference_replicas = inference_replicas
        self.state_dir = Path(state_dir)
        self.model_dirs = {model.name: model.build() for model in self.models}
        swarm_models = [SwarmModel(self.model_dirs[m.name], m.block_ranges, m.dht_prefix) for m in self.models]
        self.swarm = PrivateSwarm.of_models(swarm_models, self.state_dir / "swarm")
        self.services: list[ServiceProcess] = []
        self.handover_token = secrets.token_urlsafe(24)  # the replicas hand sessions to each other with it
        self.discovery_file = self.state_dir / "inference-replicas.txt"  # INFERENCE_DISCOVERY=file://...

    def _replicas(self) -> list[ServiceProcess]:
        return [service for service in self.services if service.name.startswith("inference-")]

    def _write_discovery_file(self) -> None:
        """List the inference replicas whose process runs (ready or not: the readers ask their /readyz)."""
        running = {s.name: s.base_url for s in self._replicas() if s.process and s.process.poll() is None}
        write_discovery_file(self.discovery_file, running)

    def restart_stopped(self) -> list[str]:
        """Start again every inference replica whose process has exited (SIGTERM, a crash), as a
        StatefulSet would, taking it out of the discovery file meanwhile; returns their names."""
        stopped = [s for s in self._replicas() if s.process and s.process.poll() is not None]
        if not stopped:
            return []
        self._write_discovery_file()
        for service in stopped:
            kill_group(service.process.pid)  # what its group left behind
            service.start()
        self._write_discovery_file()
        return [service.name for service in stopped]

    def start(self, timeout: float = 240.0) -> LocalStack:
        """Start the swarm, the inference replicas, then the gateway at the public port."""
        logs = self.state_dir / "logs"
        try:
            self.swarm.start(timeout)
            write_discovery_file(self.discovery_file, {})
            replicas = {}
            for model in self.models:
                urls = {f"inference-{model.name}-{i}": f"http://127.0.0.1:{self.public_port + 10 + len(replicas) + i}"
                        for i in range(self.inference_replicas)}  # fmt: skip
                for replica_id, url in urls.items():
                    replica = inference_process(
                        model_dir=self.model_dirs[model.name],
                        initial_peers=self.swarm.initial_peers,
                        dht_prefix=model.dht_prefix,
                        port=int(url.rpartition(":")[2]),
                        log_path=logs / f"{replica_id}.log",
                        replica_id=replica_id,
                        extra_env={
                            "MODEL_NAME": model.name,
                            "MODEL_DESCRIPTION": model.description,
                            **handover_env(self.discovery_file, self.handover_token),
                        },
                    )
                    self.services.append(replica.start())
                    self._write_discovery_file()
                    replicas[replica.name] = replica.base_url
            ui = ui_process(port=self.public_port + 9, log_path=logs / "ui.log")
            self.services.append(ui.start())
            for service in self.services:
                service.wait_ready(timeout)
            gateway = gateway_process(
                discovery_file=self.discovery_file,
                port=self.public_port,
                log_path=logs / "gateway.log",
                extra_env={"UI_URL": ui.base_url, "DEFAULT_MODEL": self.models[0].name},
            )
            self.services.append(gateway.start())
            gateway.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.public_port}"

    def stop(self) -> None:
        """Stop the services (gracefully), then the swarm."""
        for service in reversed(self.services):
            service.stop()
            if service.name.startswith("inference-"):
                self._write_discovery_file()
        self.services.clear()
        self.swarm.stop()


__all__ = [
    "DEFAULT_LOCAL_MODELS",
    "LOCAL_MODELS",
    "SMOLLM2",
    "TINY_BLOOM",
    "LocalModel",
    "LocalStack",
    "ServiceProcess",
    "StartupError",
    "discovery_env",
    "gateway_process",
    "handover_env",
    "inference_process",
    "pick_free_port",
    "ui_process",
    "write_discovery_file",
]
