"""Helpers of the tests: services on the test swarm, dedicated stacks, metrics text, raw HTTP,
process resource figures (from client/probes.py, which also polls). Fixtures stay in conftest.py."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.probes import open_fds, process_tree, rss_bytes
from deploy.local_stack import ServiceProcess, gateway_process, inference_process, pick_free_port
from services.swarm.launcher import PrivateSwarm

DHT_PREFIX = "petals-chat-test"
CHATML_MODEL = "tiny-bloom-chatml"
CHATML_DESCRIPTION = "Tiny BLOOM again, spoken to in ChatML <b>(a second model)</b>"


SMOL_DHT_PREFIX = "petals-chat-smollm2"  # the SmolLM2 oracle tests' swarms
SMOL_NEW_TOKENS = 24  # the SmolLM2 oracle's greedy tokens per prompt
SMOL_QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea."]


def chatml(tokenizer, question: str) -> list[int]:
    """The prompt's ids: the model's own chat template, default system prompt, assistant turn open."""
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


FAST_CHECKS = {"READINESS_INTERVAL_SECONDS": "1", "SWARM_STATE_REFRESH_SECONDS": "1"}  # the tests' replicas


def start_inference(
    swarm: PrivateSwarm, model_dir: Path, artifacts_dir: Path, name: str, port: int | None = None, **env: str
) -> ServiceProcess:
    """Start an inference service on the test swarm (at ``port``, else a free one) and wait until it is
    ready. Its client-side layers run in float32, the oracle's dtype: on a CPU with AMX the default
    would be bfloat16, whose greedy tokens drift from the float32 oracle's (``env`` may say otherwise)."""
    service = inference_process(
        model_dir=model_dir,
        initial_peers=swarm.initial_peers,
        dht_prefix=DHT_PREFIX,
        port=port or pick_free_port(),
        log_path=artifacts_dir / "logs" / f"{name}.log",
        replica_id=name,
        extra_env={**FAST_CHECKS, "TORCH_DTYPE": "float32", **env},
    )
    return service.start_ready(timeout=180)


def start_gateway(artifacts_dir: Path, replica_urls: dict[str, str], name: str, **env: str) -> ServiceProcess:
    """Start a gateway routing to the given replicas and wait until one of them is ready."""
    gateway = gateway_process(
        replicas=replica_urls,
        port=pick_free_port(),
        log_path=artifacts_dir / "logs" / f"{name}.log",
        name=name,
        extra_env={"REPLICA_POLL_INTERVAL_SECONDS": "0.5", **env},
    )
    return gateway.start_ready(timeout=60)


def each_in_a_thread(count: int, work: Callable[[int], Any], timeout_s: float = 300.0) -> list[Any]:
    """``work(index)`` for each index in its own thread, at once; each one's result, or the exception it
    raised (reported by the caller, with the index)."""
    results: list[Any] = [RuntimeError("no result: the thread did not finish")] * count

    def run(index: int) -> None:
        try:
            results[index] = work(index)
        except BaseException as error:
            results[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
    return results


def metric_value(metrics_text: str, name: str) -> float:
    """One sample's value from Prometheus text (``name`` with its labels, if any); 0 if absent."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", metrics_text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@dataclass(frozen=True)
class Stack:
    """A gateway in front of its own inference replicas."""

    gateway: ServiceProcess
    replicas: tuple[ServiceProcess, ...]


@contextmanager
def dedicated_stack(
    swarm: PrivateSwarm,
    model_dir: Path,
    artifacts_dir: Path,
    name: str,
    *,
    replicas: int = 1,
    shared_env: dict[str, str] | None = None,
    inference_env: dict[str, str] | None = None,
    gateway_env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """Start ``replicas`` inference services and a gateway (``shared_env`` goes to both, e.g. the
    limits); stop them all on exit."""
    with ExitStack() as stop:
        started = []
        for index in range(replicas):
            env = {**(shared_env or {}), **(inference_env or {})}
            service = start_inference(swarm, model_dir, artifacts_dir, f"{name}-inference-{index}", **env)
            stop.callback(service.stop)
            started.append(service)
        urls = {service.name: service.base_url for service in started}
        gateway = start_gateway(artifacts_dir, urls, f"{name}-gateway", **{**(shared_env or {}), **(gateway_env or {})})
        stop.callback(gateway.stop)
        yield Stack(gateway, tuple(started))


@dataclass(frozen=True)
class RawResponse:
    """An HTTP response read off a raw socket."""

    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_head(method: str, path: str, headers: list[tuple[str, str]] | None = None, *, close: bool = True) -> bytes:
    """A request line and headers, exactly as given (plus Host, and Connection: close unless
    ``close`` is false), ready to send."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{name}: {value}" for name, value in headers or [])]
    lines += ["Connection: close"] if close else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def raw_exchange(port: int, data: bytes, *, timeout: float = 30.0) -> RawResponse:
    """Send raw bytes on a new connection and read one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_response(sock)


def read_response(sock: socket.socket) -> RawResponse:
    """Read one HTTP response: up to its Content-Length, or until the server closes."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection after {buffer!r}")
        buffer += chunk
    head, _, body = buffer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
    length = int(headers["content-length"]) if "content-length" in headers else None
    while length is None or len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return RawResponse(int(status_line.split()[1]), headers, body)


@dataclass(frozen=True)
class Resources:
    """Name (/proc/PID/comm), RSS and open file descriptors of each process of a process tree."""

    names: dict[int, str]
    rss: dict[int, int]
    fds: dict[int, int]

    @classmethod
    def of(cls, service: ServiceProcess) -> Resources:
        assert service.process is not None
        pids = process_tree(service.process.pid)
        names = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in pids}
        return cls(names, {pid: rss_bytes(pid) for pid in pids}, {pid: open_fds(pid) for pid in pids})

    def describe(self, later: Resources) -> str:
        """Each process's RSS (MiB) and FDs, here and in ``later``."""
        return ", ".join(
            f"{self.names[pid]}[{pid}] RSS {self.rss[pid] / 2**20:.1f}->{later.rss.get(pid, 0) / 2**20:.1f} MiB "
            f"FDs {self.fds[pid]}->{later.fds.get(pid, 0)}"
            for pid in self.rss
        )


class SwarmProbe:
    """A running ``tests.swarm_probe``: ``free()`` says how many cache tokens each server has free."""

    def __init__(self, initial_peers: list[str], dht_prefix: str, blocks: int, log_path: Path) -> None:
        command = [sys.executable, "-m", "tests.swarm_probe", "--dht-prefix", dht_prefix, "--blocks", str(blocks)]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*command, "--initial-peers", *initial_peers],
                cwd=Path(__file__).resolve().parents[1],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,
            )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert json.loads(self._line(timeout=120)) == {"ready": True}

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)

    def _line(self, timeout: float) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the swarm probe did not answer in {timeout} s") from None

    def free(self) -> dict[str, int]:
        """{server peer id: attention-cache tokens free}, asked now."""
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        return json.loads(self._line(timeout=60))

    def close(self) -> None:
        """End the probe (its DHT node and p2p daemon with it)."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


# An init script that records the page's Content-Security-Policy violations in window.__violations
# ("<directive> <blocked URI>" each).
RECORD_CSP_VIOLATIONS = (
    "window.__violations = []; document.addEventListener('securitypolicyviolation',"
    " (e) => window.__violations.push(`${e.violatedDirective} ${e.blockedURI}`))"
)


def collect_page_errors(page: Any, into: list[str]) -> list[str]:
    """Append a Playwright page's console errors and uncaught exceptions to ``into``; returns it."""
    page.on("console", lambda message: into.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: into.append(str(error)))
    return into


def wait_for(page: Any, expression: str, timeout: float = 30_000) -> None:
    """Poll a JavaScript expression on a Playwright page until it is truthy (``timeout`` in ms, as
    Playwright's). Not ``page.wait_for_function``: it evaluates its string with ``eval``, which the
    page's Content-Security-Policy refuses (as it should)."""
    deadline = time.monotonic() + timeout / 1000
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{expression!r} still false after {timeout:.0f} ms")
        time.sleep(0.05)


DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "petals-chat.json"
BATCHING_ROW = "Swarm batching"  # the dashboard's row of the batching servers' own metrics (SWARM_METRICS_PORT)


def dashboard_panels_by_row() -> dict[str, list[dict]]:
    """The shipped dashboard's panels (less its rows) by the title of the row above them ("": before the first)."""
    rows: dict[str, list[dict]] = {"": []}
    title = ""
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            title = panel["title"]
            rows[title] = []
        else:
            rows[title].append(panel)
    return rows


def panel_queries(panels: list[dict]) -> list[str]:
    return [target["expr"] for panel in panels for target in panel["targets"]]


def metric_names(query: str) -> set[str]:
    """The project's metric names a PromQL query uses."""
    return set(re.findall(r"\bpetals_chat_[a-z_]+", query))


def prometheus_query(prometheus_url: str, expr: str) -> list:
    import requests

    response = requests.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert response["status"] == "success", (expr, response)
    return response["data"]["result"]


def prometheus_query_or_empty(prometheus_url: str, expr: str) -> list:
    import requests

    try:
        return prometheus_query(prometheus_url, expr)
    except requests.RequestException:
        return []  # not listening yet


def exported_metric_names(*base_urls: str) -> set[str]:
    """Every sample name the services at ``base_urls`` serve on /metrics."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    names = set()
    for base_url in base_urls:
        for family in text_string_to_metric_families(requests.get(f"{base_url}/metrics", timeout=10).text):
            names.update(sample.name for sample in family.samples)
    return names


@contextmanager
def running_prometheus(targets: dict[str, str], rules: Path, work_dir: Path) -> Iterator[str]:
    """A real Prometheus (Debian's) scraping ``targets`` (job -> base URL) every second and evaluating
    ``rules`` every second; yields its URL. Stopped (by its pid) on the way out."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [url.removeprefix("http://")]}]}
            for job, url in targets.items()
        ],
    }
    (work_dir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = pick_free_port()
    process = subprocess.Popen(
        ["prometheus", f"--config.file={work_dir / 'prometheus.yml'}", f"--storage.tsdb.path={work_dir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(work_dir / "prometheus.log").open("w"),
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)
