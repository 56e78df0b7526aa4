"""The event-loop gateway under many connections: its targets (docs/benchmarks.md), printed, never asserted.

Starts a private swarm on loopback (tiny BLOOM, 2 servers "0:2" and "2:4"), one inference replica
and one gateway (2 Uvicorn workers), then measures:

1. ``/readyz`` and a v1 ``generate`` (session-less, 4 tokens, greedy) through the gateway, unloaded;
2. the same while ``--connections`` WebSocket connections are open at once (default 2,000: half
   idle after the handshake, half "between messages": they opened a session and wait), with the
   gateway workers' memory per open connection (RSS before and after, over the connections);
   target: each answers within 1.5x its unloaded time;
3. ``--streams`` concurrent streams (default 200) relayed by the gateway, SSE and WebSocket, each
   generating ``--stream-tokens`` greedily from its own prompt; target: zero errors and every text
   equal to the same request made directly to the replica;
4. the gateway hop's cost per token for one stream (``--tokens`` tokens, ``--rounds`` rounds,
   alternating direct and through the gateway): the difference in time per token, and the
   gateway's CPU time per token (from /proc); target: at most 1 ms per token;
5. WebSocket ``generate`` messages answered step by step (``stop_sequence`` that never comes,
   ``max_new_tokens`` 1, until the session is full), ``--rounds`` rounds: tokens per second and the
   gateway's CPU seconds per token; with ``--baseline-tree PATH`` (e.g. a ``git worktree add
   /tmp/gw-base <commit>`` checkout) the same through a second gateway run from that tree, against the
   same replica, alternating, side by side with the ratio.

Run: ``.venv/bin/python -m bench.websocket_gateway [--connections 2000] [--streams 200] [--rounds 5]
[--phases connections,streams,hop,steps] [--baseline-tree PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import itertools
import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from websockets.asyncio.client import ClientConnection

from bench.common import load_average
from client.api import ask_async, connect_ws_async
from client.probes import process_tree, rss_bytes
from deploy.local_stack import REPO_ROOT, ServiceProcess, gateway_process, inference_process, pick_free_port
from services.common.web.sse import parse_sse_async
from services.swarm.launcher import PrivateSwarm
from services.swarm.tiny_bloom import ensure_tiny_bloom

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DHT_PREFIX = "petals-chat-bench-ws"
INFERENCE_ENV = {"MAX_SESSIONS": "1400", "GUNICORN_THREADS": "320", "SESSION_TTL_SECONDS": "900",
                 "READINESS_INTERVAL_SECONDS": "2"}  # fmt: skip
# Its thousands of connections are one client's: no per-client connection limit.
STEPS_STOP = "\u2603 never"  # a stop sequence the model does not generate: answers end when the session is full
GATEWAY_ENV = {"GUNICORN_WORKERS": "2", "WS_IDLE_TIMEOUT_SECONDS": "900", "REPLICA_POLL_INTERVAL_SECONDS": "2",
               "WS_MAX_CONNECTIONS_PER_CLIENT": "0"}  # fmt: skip


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard one: every connection is a file descriptor, here and in the gateway."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


def http_call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload else {}
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@dataclass
class Probe:
    """Times of /readyz and of a short v1 generate through the gateway (new connection each)."""

    readyz_ms: list[float] = field(default_factory=list)
    generate_ms: list[float] = field(default_factory=list)

    @staticmethod
    def run(port: int, readyz: int = 100, generates: int = 20) -> Probe:
        probe = Probe()
        for _ in range(readyz):
            started = time.perf_counter()
            status, _ = http_call(port, "GET", "/readyz")
            assert status == 200, status
            probe.readyz_ms.append((time.perf_counter() - started) * 1000)
        for index in range(generates):
            started = time.perf_counter()
            status, body = http_call(port, "POST", "/api/v1/generate",
                                     {"inputs": f"Probe {index % 2}", "max_new_tokens": 4})  # fmt: skip
            assert status == 200 and json.loads(body)["ok"], body
            probe.generate_ms.append((time.perf_counter() - started) * 1000)
        return probe

    def medians(self) -> tuple[float, float]:
        return statistics.median(self.readyz_ms), statistics.median(self.generate_ms)


def gateway_rss(gateway: ServiceProcess) -> dict[int, int]:
    """RSS of the gateway's workers (the master's children)."""
    assert gateway.process is not None
    return {pid: rss_bytes(pid) for pid in process_tree(gateway.process.pid)[1:]}


def proc_cpu_s(pids: list[int]) -> float:
    ticks, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


async def gathered(count: int, limit: int, make: Callable[[int], Awaitable[Any]]) -> list[Any]:
    """``make(i)`` for i < count, at most ``limit`` at once; exceptions returned, not raised."""
    gate = asyncio.Semaphore(limit)

    async def one(index: int) -> Any:
        async with gate:
            return await make(index)

    return await asyncio.gather(*(one(index) for index in range(count)), return_exceptions=True)


async def many_connections(stack: Stack, count: int) -> None:
    """Phase 2: ``count`` open connections, half idle and half holding a session."""
    port, gateway = stack.gateway.port, stack.gateway
    unloaded = await asyncio.to_thread(Probe.run, port)
    before = gateway_rss(gateway)
    idle_count = count // 2
    started = time.perf_counter()
    idle = await gathered(idle_count, 200, lambda i: connect_ws_async(port))
    rss_idle = gateway_rss(gateway)

    async def with_session(index: int) -> ClientConnection:
        ws = await connect_ws_async(port)
        answer = await ask_async(ws, {"type": "open_inference_session", "max_length": 32})
        if not answer.get("ok"):
            raise RuntimeError(answer)
        return ws

    sessions = await gathered(count - idle_count, 100, with_session)
    opened_s = time.perf_counter() - started
    sockets = [ws for ws in idle + sessions if not isinstance(ws, BaseException)]
    errors = [repr(ws) for ws in idle + sessions if isinstance(ws, BaseException)]
    rss_all = gateway_rss(gateway)
    await asyncio.sleep(1)
    loaded = await asyncio.to_thread(Probe.run, port)
    still_open = sum(1 for ws in sockets if ws.state.name == "OPEN")
    replica = json.loads((await asyncio.to_thread(http_call, stack.inference.port, "GET", "/readyz"))[1])
    total = lambda rss: sum(rss.values()) / 2**20  # noqa: E731
    print(f"\n## {count} WebSocket connections open at once on one gateway (2 workers)")
    print(f"opened in {opened_s:.1f} s: {len(sockets)} open, {len(errors)} failed {errors[:3]}; "
          f"still open when measured: {still_open}; sessions on the replica: {replica['active_sessions']}")  # fmt: skip
    idle_kib = (total(rss_idle) - total(before)) * 1024 / max(idle_count, 1)
    session_kib = (total(rss_all) - total(rss_idle)) * 1024 / max(count - idle_count, 1)
    all_kib = (total(rss_all) - total(before)) * 1024 / max(len(sockets), 1)
    print(f"gateway workers' RSS: {total(before):.1f} MiB before, {total(rss_idle):.1f} MiB with {idle_count} idle, "
          f"{total(rss_all):.1f} MiB with all {len(sockets)}; per connection: idle {idle_kib:.1f} KiB, "
          f"holding a session {session_kib:.1f} KiB, overall {all_kib:.1f} KiB")  # fmt: skip
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        replica = json.loads((await asyncio.to_thread(http_call, stack.inference.port, "GET", "/readyz"))[1])
        if replica["active_sessions"] == 0:
            break
        await asyncio.sleep(0.5)
    print(f"after closing them all: {replica['active_sessions']} sessions left on the replica")
    after = await asyncio.to_thread(Probe.run, port)
    (readyz_a, generate_a), (readyz_b, generate_b) = unloaded.medians(), after.medians()
    print(f"unloaded: /readyz {readyz_a:.2f} ms before, {readyz_b:.2f} ms after; generate {generate_a:.2f} ms before, "
          f"{generate_b:.2f} ms after (the table's unloaded figure is their mean)")  # fmt: skip
    readyz_0, generate_0 = (readyz_a + readyz_b) / 2, (generate_a + generate_b) / 2
    readyz_1, generate_1 = loaded.medians()
    print("| probe (median) | unloaded ms | with the connections open ms | ratio | target <= 1.5x |")
    print("| --- | --- | --- | --- | --- |")
    for name, base, load in (("GET /readyz", readyz_0, readyz_1), ("POST /api/v1/generate (4 tokens)", generate_0,
                                                                     generate_1)):  # fmt: skip
        print(f"| {name} | {base:.2f} | {load:.2f} | {load / base:.2f} | {'met' if load <= 1.5 * base else 'MISSED'} |")


async def sse_text(http: aiohttp.ClientSession, base_url: str, body: dict) -> tuple[str, list[float]]:
    """One SSE stream: its done outputs and each token's arrival time."""
    times: list[float] = []
    async with http.post(f"{base_url}/api/v2/generate_stream", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        async for event, data in parse_sse_async(response.content.iter_any()):
            if event == "token":
                times.append(time.perf_counter())
            elif event == "done":
                return data["outputs"], times
            else:
                raise RuntimeError(f"{event}: {data}")
    raise RuntimeError("no done event")


async def ws_text(port: int, prompt: str, tokens: int) -> str:
    ws = await connect_ws_async(port)
    try:
        opened = await ask_async(ws, {"type": "open_inference_session", "max_length": 64})
        if not opened.get("ok"):
            raise RuntimeError(opened)
        answer = await ask_async(ws, {"type": "generate", "inputs": prompt, "max_new_tokens": tokens})
        if not answer.get("ok"):
            raise RuntimeError(answer)
        return answer["outputs"]
    finally:
        await ws.close()


async def concurrent_streams(stack: Stack, count: int, tokens: int) -> None:
    """Phase 3: ``count`` streams at once, direct to the replica, then relayed by the gateway (SSE, WebSocket)."""
    prompts = [f"Stream {index}: a human talks to an AI" for index in range(count)]
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:

        async def direct_sse(i: int) -> str:
            return (await sse_text(http, stack.inference.base_url, {"inputs": prompts[i], "max_new_tokens": tokens}))[0]

        async def gateway_sse(i: int) -> str:
            return (await sse_text(http, stack.gateway.base_url, {"inputs": prompts[i], "max_new_tokens": tokens}))[0]

        print(f"\n## {count} concurrent streams of {tokens} greedy tokens")
        print("(a WebSocket answer is in a session, so its reference is a session too: a session holds back an")
        print("incomplete last character that a session-less answer releases as U+FFFD)")
        print("| client | wall s | errors | texts equal to the same request made directly to the replica |")
        print("| --- | --- | --- | --- |")
        results: dict[str, list[Any]] = {}

        async def direct_in_session(i: int) -> str:
            """A WebSocket's request made directly: a v1 session on the replica, one SSE request in it."""
            _, body = await asyncio.to_thread(http_call, stack.inference.port, "GET",
                                                   "/api/v1/open_inference_session?max_length=64")  # fmt: skip
            session_id = json.loads(body)["session_id"]
            try:
                request = {"inputs": prompts[i], "max_new_tokens": tokens, "session_id": session_id}
                return (await sse_text(http, stack.inference.base_url, request))[0]
            finally:
                await asyncio.to_thread(http_call, stack.inference.port, "GET",
                                        f"/api/v1/close_inference_session?session_id={session_id}")  # fmt: skip

        async def gateway_ws(i: int) -> str:
            return await ws_text(stack.gateway.port, prompts[i], tokens)

        clients = {"direct to the replica (SSE)": direct_sse, "gateway SSE": gateway_sse}
        clients["direct to the replica, in a session (SSE)"] = direct_in_session
        clients["gateway WebSocket"] = gateway_ws
        references = {"gateway SSE": "direct to the replica (SSE)",
                      "gateway WebSocket": "direct to the replica, in a session (SSE)"}  # fmt: skip
        for name, make in clients.items():
            started = time.perf_counter()
            results[name] = await gathered(count, count, make)
            wall = time.perf_counter() - started
            errors = [r for r in results[name] if isinstance(r, BaseException)]
            reference = results[references.get(name, name)]
            equal = sum(1 for mine, ref in zip(results[name], reference, strict=True)
                        if not isinstance(mine, BaseException) and mine == ref)  # fmt: skip
            print(f"| {name} | {wall:.1f} | {len(errors)} {[repr(e)[:80] for e in errors[:2]]} | {equal}/{count} |")


async def per_token_cost(stack: Stack, tokens: int, rounds: int) -> None:
    """Phase 4: one stream at a time, direct and through the gateway, alternating."""
    workers = process_tree(stack.gateway.process.pid)[1:]
    prompt = "A human talks to a powerful AI that follows the human's instructions."
    body = {"inputs": prompt, "max_new_tokens": tokens}
    gaps: dict[str, list[float]] = {"direct": [], "gateway": []}
    per_token: dict[str, list[float]] = {"direct": [], "gateway": []}
    gateway_cpu = 0.0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        await sse_text(http, stack.gateway.base_url, body)  # warm-up
        for _ in range(rounds):
            for name, base in (("direct", stack.inference.base_url), ("gateway", stack.gateway.base_url)):
                cpu = proc_cpu_s(workers)
                started = time.perf_counter()
                _, times = await sse_text(http, base, body)
                per_token[name].append((times[-1] - started) / len(times) * 1000)
                gaps[name] += [(b - a) * 1000 for a, b in itertools.pairwise(times)]
                if name == "gateway":
                    gateway_cpu += proc_cpu_s(workers) - cpu
    direct, relayed = statistics.mean(per_token["direct"]), statistics.mean(per_token["gateway"])
    gap_direct, gap_relayed = statistics.median(gaps["direct"]), statistics.median(gaps["gateway"])
    cpu_ms = gateway_cpu * 1000 / (rounds * tokens)
    print(f"\n## The gateway hop per token, one SSE stream of {tokens} tokens, {rounds} rounds")
    print("| measure | direct | through the gateway | gateway hop |")
    print("| --- | --- | --- | --- |")
    print(f"| time per token, mean ms | {direct:.2f} | {relayed:.2f} | {relayed - direct:+.2f} |")
    print(f"| gap between tokens, median ms | {gap_direct:.2f} | {gap_relayed:.2f} | {gap_relayed - gap_direct:+.2f} |")
    print(f"| gateway workers' CPU per token, ms | | {cpu_ms:.3f} | {cpu_ms:.3f} |")
    print(f"target: at most 1 ms per token: {'met' if cpu_ms <= 1.0 and relayed - direct <= 1.0 else 'MISSED'} "
          "(CPU per token, and the difference in time per token, which the swarm's jitter blurs)")  # fmt: skip


async def stepped_answer(port: int, prompt: str, max_length: int) -> tuple[int, str]:
    """One WebSocket ``generate`` message generated a token a step until its session is full; its
    tokens and text."""
    ws = await connect_ws_async(port)
    try:
        opened = await ask_async(ws, {"type": "open_inference_session", "max_length": max_length})
        if not opened.get("ok"):
            raise RuntimeError(opened)
        message = {"type": "generate", "inputs": prompt, "max_new_tokens": 1, "stop_sequence": STEPS_STOP}
        answer, tokens, text = await ask_async(ws, message), 0, ""
        while answer.get("ok"):
            tokens, text = tokens + answer["token_count"], text + answer["outputs"]
            if answer["stop"]:
                return tokens, text
            answer = json.loads(await ws.recv())
        raise RuntimeError(answer)
    finally:
        await ws.close()


async def websocket_steps(stack: Stack, max_length: int, rounds: int) -> None:
    """Phase 5: stepped WebSocket answers through this tree's gateway and the baseline's, alternating."""
    gateways = {"this tree": stack.gateway}
    if stack.baseline is not None:
        gateways["baseline"] = stack.baseline
    workers = {name: process_tree(gateway.process.pid)[1:] for name, gateway in gateways.items()}
    prompt = "A human talks to a powerful AI that follows the human's instructions."
    tokens, texts = dict.fromkeys(gateways, 0), {name: set() for name in gateways}
    seconds, cpu_s = dict.fromkeys(gateways, 0.0), dict.fromkeys(gateways, 0.0)
    for gateway in gateways.values():
        await stepped_answer(gateway.port, prompt, max_length)  # warm-up
    for _ in range(rounds):
        for name, gateway in gateways.items():
            cpu, started = proc_cpu_s(workers[name]), time.perf_counter()
            count, text = await stepped_answer(gateway.port, prompt, max_length)
            tokens[name], texts[name] = tokens[name] + count, texts[name] | {text}
            seconds[name] += time.perf_counter() - started
            cpu_s[name] += proc_cpu_s(workers[name]) - cpu
    print(f"\n## WebSocket answers a token a step (session max_length {max_length}), {rounds} rounds each")
    print("| gateway | tokens | tokens/s | gateway CPU s per token |")
    print("| --- | --- | --- | --- |")
    for name in gateways:
        print(f"| {name} | {tokens[name]} | {tokens[name] / seconds[name]:.1f} | {cpu_s[name] / tokens[name]:.5f} |")
    if stack.baseline is not None:
        speed = (tokens["this tree"] / seconds["this tree"]) / (tokens["baseline"] / seconds["baseline"])
        cpu = (cpu_s["this tree"] / tokens["this tree"]) / (cpu_s["baseline"] / tokens["baseline"])
        print(
            f"this tree / baseline: tokens/s x{speed:.2f}, gateway CPU per token x{cpu:.2f}; "
            f"every text the same through both: {len(texts['this tree'] | texts['baseline']) == 1}"
        )


@dataclass
class Stack:
    swarm: PrivateSwarm
    inference: ServiceProcess
    gateway: ServiceProcess
    baseline: ServiceProcess | None = None  # a gateway run from another source tree

    @classmethod
    def start(cls, logs: Path, baseline_tree: Path | None = None) -> Stack:
        model_dir = ensure_tiny_bloom()
        swarm = PrivateSwarm(model_dir, ["0:2", "2:4"], logs / "swarm", dht_prefix=DHT_PREFIX).start(240)
        started: list[ServiceProcess] = []
        try:
            inference = inference_process(model_dir=model_dir, initial_peers=swarm.initial_peers,
                                          dht_prefix=DHT_PREFIX, port=pick_free_port(), log_path=logs / "inference.log",
                                          extra_env=INFERENCE_ENV)  # fmt: skip
            started.append(inference.start_ready(240))
            replicas = {started[0].name: started[0].base_url}
            trees = {"gateway": REPO_ROOT} | ({"baseline-gateway": baseline_tree} if baseline_tree else {})
            for name, root in trees.items():
                gateway = gateway_process(replicas=replicas, port=pick_free_port(), log_path=logs / f"{name}.log",
                                          extra_env=GATEWAY_ENV, name=name, root=root)  # fmt: skip
                started.append(gateway.start_ready(60))
        except BaseException:
            for process in reversed(started):
                process.stop()
            swarm.stop()
            raise
        return cls(swarm, *started)

    def stop(self) -> None:
        if self.baseline is not None:
            self.baseline.stop()
        self.gateway.stop()
        self.inference.stop()
        self.swarm.stop()


async def run(args: argparse.Namespace, stack: Stack) -> None:
    phases = set(args.phases.split(","))
    if "connections" in phases:
        await many_connections(stack, args.connections)
    if "streams" in phases:
        await concurrent_streams(stack, args.streams, args.stream_tokens)
    if "hop" in phases:
        await per_token_cost(stack, args.tokens, args.rounds)
    if "steps" in phases:
        await websocket_steps(stack, args.steps_max_length, args.rounds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--stream-tokens", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-max-length", type=int, default=96, help="phase 5: the session's max_length")
    parser.add_argument("--phases", default="connections,streams,hop,steps", help="comma-separated, of these")
    parser.add_argument("--baseline-tree", type=Path, default=None, help="phase 5: also a gateway from this tree")
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    soft, hard = raise_fd_limit()
    print(f"RLIMIT_NOFILE: soft {soft} -> {hard} (the gateway's gunicorn config does the same); load {load_average()}")
    logs = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-websocket-"))
    print(f"logs: {logs}")
    stack = Stack.start(logs, args.baseline_tree)
    try:
        asyncio.run(run(args, stack))
    finally:
        stack.stop()
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    main()
