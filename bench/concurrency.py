"""Concurrent sessions: raw Petals client vs the inference service (v1 per token, v2 stream) vs the gateway.

For each model (``--models``: the offline tiny BLOOM, 2 servers "0:2" and "2:4", and SmolLM2-135M,
2 servers "0:15" and "15:30"), one run starts a private swarm on loopback, timing each part's cold
start to ready, then one inference service, one gateway and the ui (gunicorn), and the raw Petals
client in a process of its own (bench/raw_process.py: nothing else shares its interpreter, as for a
user of the bare library). For each number of concurrent sessions
(``--sessions``, default 1 4 16 32) and each of ``--rounds`` rounds, every client runs that many
sessions at once, each generating ``--tokens`` tokens greedily from its own prompt; the clients take
turns within a round, the order rotating from round to round so drift hits all alike. Clients:

- ``raw``: the Petals client in its own process, one thread per session, each with its own
  ``InferenceSession`` and one ``model.generate`` call (as the service generates);
- ``v1 per-token``: the inference service's v1 API, one HTTP request per token (open a session,
  the prompt with max_new_tokens=1, then max_new_tokens=1 per request, close);
- ``stream``: ``POST /api/v2/generate_stream`` on the inference service (one SSE request);
- ``gateway stream``: the same through the gateway (one more hop).

Per (client, N): aggregate tokens/s (all tokens / time from the common start to the last token),
per-token latency p50/p99 (time between a session's consecutive tokens as its client sees them),
time to first token, errors, the ratio to raw, and the CPU time per token of this process, the
services and the swarm (from /proc, by process group), with the CPU that every other process of
the machine used meanwhile (other people's work skews a run: this says how much). One unmeasured
warm-up round runs first. Figures are printed, never asserted, against the targets (TARGETS); under
each throughput target, the ceiling the swarm's own CPU sets on this machine (its cores over the
swarm's CPU per token in raw's run: tokens/s no client could exceed).
``--server-threads``, ``--small-tensor-bytes`` (the servers' SWARM_SMALL_TENSOR_BYTES),
``--server-handlers`` (their ``--num_handlers``) and ``--batching`` (their SWARM_BATCHING, default
``off on``) take several values: one whole run for each, side by side (bench/server_handlers.py
compares handler counts with the swarms alive together instead). After the batching runs of a
setting, bench/batching_ab.py prints them side by side: tokens/s off and on, p50/p99, the swarm's
CPU per token, whether the greedy outputs with batching on equal those with it off, against the
stock baseline (the raw client with batching off) and the in-process limit (bench/in_process_limit.py:
transformers ``generate`` at batch N in one child process, measured first for each model), with
verdicts against its BATCHING_TARGETS.
Run: ``.venv/bin/python -m bench.concurrency [--tokens 32] [--sessions 1 4 16 32] [--rounds 3]
[--clients raw v1 stream gateway] [--small-tensor-bytes 0 1048576] [--server-handlers 8 0]
[--batching off on] [--log-dir DIR]`` (or ``make bench-concurrency``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.batching_ab import OFF, ON, report_batching
from bench.common import (
    BENCH_MODELS,
    BenchModel,
    add_models_argument,
    exit_on_sigterm,
    load_average,
    machine_description,
    prompt_for,
)
from bench.in_process_limit import measure_in_process
from bench.inference_latency import DHT_PREFIX, RawClient, ServiceClient  # sets HF_HUB_OFFLINE first
from bench.load_results import (
    CPU_SETS,
    OTHERS,
    LoadResult,
    Runs,
    SessionResult,
    Summary,
    print_table,
    summarize,
    verdict,
)
from bench.raw_process import RawProcess
from client.api import Api
from deploy.local_stack import ServiceProcess, gateway_process, inference_process, pick_free_port, ui_process
from services.common.processes.cpus import available_cpus
from services.inference.settings import default_dtype
from services.swarm import batching_pool, small_tensors
from services.swarm.launcher import PETALS_NUM_HANDLERS, SERVER_TORCH_THREADS, PrivateSwarm, handlers_per_server

# The concurrency targets (docs/benchmarks.md), printed with a verdict each, never asserted; the batching
# targets are bench/batching_ab.py's BATCHING_TARGETS.
TARGETS = (
    "16 and 32 sessions through the gateway: at least 100 tokens/s and 0.95x the raw client, zero errors",
    "time per token over raw's: gateway stream at most 1.05x at 1 session; v1 per-token at most 1.10x at 1 and 16",
)
THROUGHPUT_TARGETS = {16: "gateway stream", 32: "gateway stream"}  # sessions: the client the target is for
TARGET_RATE, TARGET_RATIO = 100.0, 0.95
TIME_PER_TOKEN_LIMITS = {  # (sessions, client): its time per token / raw's at most
    (1, "gateway stream"): 1.05,
    (1, "v1 per-token"): 1.10,
    (16, "v1 per-token"): 1.10,
}
CLIENTS = {"raw": "raw", "v1": "v1 per-token", "stream": "stream", "gateway": "gateway stream"}  # option: name
# The inference service sized for 32 concurrent sessions plus probes (its defaults: 50 sessions, 16 stream requests
# without a session, 128 request threads); the gateway's Uvicorn workers have no request threads to size.
INFERENCE_ENV = {"MAX_SESSIONS": "64", "MAX_SESSIONLESS_REQUESTS": "64", "GUNICORN_THREADS": "64"}
GATEWAY_ENV: dict[str, str] = {}
HTTP_TIMEOUT_S = 120.0
# One in-process measurement at most: torch's threads, one per core, crawl when other work takes the cores.
IN_PROCESS_TIMEOUT_S = 150.0
SETTLE_S = 1.0  # pause between runs: one-off sessions finish closing on the servers


SessionFn = Callable[[str, int, list[float]], str]  # (prompt, tokens, token_times to append to) -> text
LoadFn = Callable[[int, int, float], "LoadResult"]  # (sessions, tokens, timeout_s) -> all sessions' results


def timed_session(run: SessionFn, prompt: str, tokens: int) -> SessionResult:
    """Run one session, catching its failure as an error."""
    result = SessionResult(start=time.perf_counter())
    try:
        result.text = run(prompt, tokens, result.token_times)
    except Exception as error:
        result.error = f"{type(error).__name__}: {error}"[:300]
    result.end = result.token_times[-1] if result.token_times and result.error is None else time.perf_counter()
    return result


class TokenTimer:
    """A transformers streamer that notes when each new token is produced (the prompt is skipped)."""

    def __init__(self, token_times: list[float]) -> None:
        self._times = token_times
        self._seen_prompt = False

    def put(self, value: Any) -> None:
        if self._seen_prompt:
            self._times.extend([time.perf_counter()] * value.numel())
        self._seen_prompt = True

    def end(self) -> None:
        """Required by the streamer interface."""


class ConcurrentRawClient(RawClient):
    """The raw Petals client, one session per thread (it runs in a RawProcess)."""

    def load(self, count: int, tokens: int, timeout_s: float) -> dict[str, Any]:
        """``run_load`` of ``count`` raw sessions, as JSON for the benchmark process."""
        result = run_load(self.session, count, tokens, timeout_s)
        return {"sessions": [asdict(session) for session in result.sessions], "wall_s": result.wall_s}

    def session(self, prompt: str, tokens: int, token_times: list[float]) -> str:
        """One InferenceSession and one generate call for ``tokens`` tokens, as the service runs it."""
        import torch
        from petals.client.inference_session import InferenceSession

        ids = torch.tensor([self.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        session = InferenceSession(self.model.transformer.h.sequence_manager, max_length=ids.shape[1] + tokens)
        try:
            output = self._generate(ids, session=session, max_new_tokens=tokens, streamer=TokenTimer(token_times))
        finally:
            session.close()
        new_ids = output[0, ids.shape[1] :].tolist()
        return self.tokenizer.decode(new_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def v1_per_token_session(base_url: str, prompt_tokens: Callable[[str], int]) -> SessionFn:
    """The seed UI's style: a session, then one v1 generate request per token."""

    def run(prompt: str, tokens: int, token_times: list[float]) -> str:
        client = ServiceClient(base_url, prompt_tokens(prompt))
        try:
            session_id = client.api.open_session(client.prompt_tokens + tokens)
            pieces = []
            for index in range(tokens):
                fields = {"inputs": prompt} if index == 0 else {}
                pieces.append(client.generate(max_new_tokens=1, session_id=session_id, **fields))
                token_times.append(time.perf_counter())
            client.api.close_session(session_id)
            return "".join(pieces)
        finally:
            client.api.close()

    return run


def stream_session(base_url: str) -> SessionFn:
    """One ``POST /api/v2/generate_stream`` for all tokens, read as Server-Sent Events."""

    def run(prompt: str, tokens: int, token_times: list[float]) -> str:
        api = Api(base_url, timeout_s=HTTP_TIMEOUT_S)
        try:
            status, events = api.events({"inputs": prompt, "max_new_tokens": tokens, "do_sample": False})
            for event, data in events:
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {data}")
                if event == "token":
                    token_times.append(time.perf_counter())
                elif event == "done":
                    return data["outputs"]
                else:
                    raise RuntimeError(f"{event} event: {data}")
            raise RuntimeError("the stream ended without a done event")
        finally:
            api.close()

    return run


def group_cpu_s(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the live processes of each named set of process
    groups, and by the whole machine (``OTHERS`` until ``measured_load`` subtracts the sets)."""
    ticks = os.sysconf("SC_CLK_TCK")
    owner = {pgid: name for name, pgids in groups.items() for pgid in pgids}
    totals = dict.fromkeys(groups, 0.0)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # fields after the command name
        except OSError:
            continue  # the process has exited
        if (name := owner.get(int(fields[2]))) is not None:  # pgrp
            totals[name] += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    totals[OTHERS] = (user + nice + system + irq + softirq + steal) / ticks
    return totals


def run_load(run: SessionFn, count: int, tokens: int, timeout_s: float) -> LoadResult:
    """``count`` sessions started together (a barrier), each in its own thread; bounded by ``timeout_s``."""
    barrier = threading.Barrier(count + 1)
    results: list[SessionResult | None] = [None] * count

    def worker(index: int) -> None:
        barrier.wait()
        results[index] = timed_session(run, prompt_for(index), tokens)

    threads = [threading.Thread(target=worker, args=(i,), name=f"session-{i}", daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join(max(0.0, start + timeout_s - time.perf_counter()))
    sessions = [r or SessionResult(start, error=f"no answer within {timeout_s:.0f} s") for r in results]
    for session in sessions:
        session.end = session.end or time.perf_counter()
    return LoadResult(sessions, max(s.end for s in sessions) - start)


def raw_load(raw: RawProcess) -> LoadFn:
    """Sessions of the raw client, run in its own process."""

    def load(count: int, tokens: int, timeout_s: float) -> LoadResult:
        reply = raw.load(count, tokens, timeout_s)
        return LoadResult([SessionResult(**session) for session in reply["sessions"]], reply["wall_s"])

    return load


def threaded_load(run: SessionFn) -> LoadFn:
    """Sessions of an HTTP client, one thread each in this process."""
    return lambda count, tokens, timeout_s: run_load(run, count, tokens, timeout_s)


def measured_load(load: LoadFn, count: int, tokens: int, timeout_s: float, groups: dict[str, list[int]]) -> LoadResult:
    """``load`` with the CPU time each set of process groups used meanwhile."""
    before = group_cpu_s(groups)
    result = load(count, tokens, timeout_s)
    result.cpu_s = {name: used - before[name] for name, used in group_cpu_s(groups).items()}
    result.cpu_s[OTHERS] -= sum(used for name, used in result.cpu_s.items() if name != OTHERS)
    return result


def measure(clients: dict[str, LoadFn], args: argparse.Namespace, groups: dict[str, list[int]]) -> Runs:
    """A warm-up round, then ``args.rounds`` rounds per session count, client order rotating."""
    counts, tokens, rounds, timeout_s = args.sessions, args.tokens, args.rounds, args.run_timeout
    names = list(clients)
    warmup = min(4, max(counts))
    for name in names:
        clients[name](warmup, min(tokens, 8), timeout_s)
    print(f"warm-up done ({warmup} sessions per client)", flush=True)
    runs: Runs = {}
    for count in counts:
        for index in range(rounds):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                time.sleep(SETTLE_S)
                result = measured_load(clients[name], count, tokens, timeout_s, groups)
                runs.setdefault((name, count), []).append(result)
                print(f"  N={count:<3} round {index + 1}/{rounds} {name:<15} {result.tokens / result.wall_s:7.2f} "
                      f"tokens/s, {len(result.errors)} errors, other processes used "
                      f"{result.cpu_s[OTHERS] / result.wall_s:.2f} cores", flush=True)  # fmt: skip
    return runs


def _round_ratios(results: list[LoadResult], raw: list[LoadResult]) -> str:
    ratios = [(r.tokens / r.wall_s) / (b.tokens / b.wall_s) for r, b in zip(results, raw, strict=True)]
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else f"{ratios[0]:.2f}"


HEADER = ("N", "client", "tokens", "wall s", "tokens/s", "x raw", "x raw/round", "x raw/CPU", "p50 ms", "p99 ms",
          "TTFT p50", "errors", *(f"CPU {name}" for name in CPU_SETS), "others")  # fmt: skip


LEGEND = f"""\
x raw/round: lowest-highest ratio of single rounds; p50, p99, TTFT p50 in ms
CPU {"/".join(CPU_SETS)}: ms of CPU time per generated token used by {"; ".join(CPU_SETS.values())}
others: CPU cores that every other process of the machine used on average meanwhile
x raw/CPU: raw's CPU per token (bench + svc + swarm) / the client's: the tokens/s ratio on a CPU-bound machine
  (N >= 4 here) had other processes left both alike"""


def report(runs: Runs, counts: list[int], clients: list[str]) -> None:
    """The throughput/latency table and the verdicts against the target."""
    rows: list[tuple[str, ...]] = [HEADER]
    verdicts = []
    for count in counts:
        raw = summarize(runs["raw", count])
        for name in clients:
            row = summarize(runs[name, count])
            ratio = row.rate / raw.rate if raw.rate else float("nan")
            cpu_ratio = raw.own_cpu_s_per_token / row.own_cpu_s_per_token
            rows.append((str(count), name, str(row.tokens), f"{row.wall_s:.1f}", f"{row.rate:.2f}", f"{ratio:.3f}",
                         _round_ratios(runs[name, count], runs["raw", count]), f"{cpu_ratio:.3f}", f"{row.p50_ms:.1f}",
                         f"{row.p99_ms:.1f}", f"{row.ttft_ms:.1f}", str(row.errors),
                         *(row.cpu_ms_per_token(cpu) for cpu in CPU_SETS), f"{row.others_cores:.2f}"))  # fmt: skip
            if THROUGHPUT_TARGETS.get(count) == name:
                met = ratio >= TARGET_RATIO and row.rate >= TARGET_RATE and row.errors == 0
                verdicts.append(f"  N={count} {name}: {row.rate:.1f} tokens/s, {ratio:.3f}x raw, {row.errors} errors: "
                                f"{verdict(met)} (CPU-normalized: {cpu_ratio:.3f}x raw)")  # fmt: skip
                verdicts.append(f"    {swarm_ceiling(raw)}")
            if (limit := TIME_PER_TOKEN_LIMITS.get((count, name))) is not None:
                per_token = 1 / ratio
                met = per_token <= limit and row.errors == 0
                verdicts.append(f"  N={count} {name}: {per_token:.3f}x raw's time per token (limit {limit:.2f}x): "
                                f"{verdict(met)}")  # fmt: skip
    print_table(rows)
    print(LEGEND)
    print("\ntargets:", *TARGETS, sep="\n  ")
    print(*verdicts, sep="\n")
    errors = sorted({e for r in runs.values() for result in r for e in result.errors})
    if errors:
        print("errors seen:", *errors[:5], sep="\n  ")


def swarm_ceiling(raw: Summary) -> str:
    """The tokens/s this machine's cores allow with the swarm's CPU per token (raw's run) and no client
    at all: where it is under TARGET_RATE, the throughput target is out of reach on this machine."""
    cores, swarm_ms = available_cpus(), raw.cpu_s["swarm"] * 1000 / raw.tokens
    return f"the swarm alone caps it at {cores * 1000 / swarm_ms:.0f} tokens/s here: {cores} cores / {swarm_ms:.1f} ms"


def report_outputs(runs: Runs, clients: list[str]) -> None:
    """Greedy outputs against the raw client's for the same prompt (v1 may hold back an incomplete last character)."""
    texts: dict[str, list[tuple[int, str]]] = {name: [] for name in clients}  # client -> (prompt index, text)
    for (name, _), results in runs.items():
        for result in results:
            texts[name] += [(i, s.text) for i, s in enumerate(result.sessions) if s.error is None]
    reference = dict(texts["raw"])
    for name in clients[1:]:
        compared = [(reference[i], text) for i, text in texts[name] if i in reference]
        same = sum(raw == text or (name == "v1 per-token" and raw.startswith(text)) for raw, text in compared)
        print(f"outputs equal to raw's (same prompt, greedy): {name}: {same}/{len(compared)} sessions")


def timed(start: Callable[[], object]) -> float:
    """Seconds ``start()`` took."""
    began = time.perf_counter()
    start()
    return time.perf_counter() - began


@dataclass(frozen=True)
class ServerSettings:
    """What one whole run sets on every Petals server."""

    torch_threads: int | None  # None: torch's default, one per core
    small_tensor_bytes: int
    num_handlers: int | None  # None: the launcher's default (handlers_per_server)
    batching: bool = False  # SWARM_BATCHING

    def describe(self, servers: int) -> str:
        """The settings in words, for a swarm of ``servers`` servers."""
        handlers = self.num_handlers or f"{handlers_per_server(servers)} (one per CPU per server)"
        return (f"torch threads per server process {self.torch_threads or 'torch default'}, "
                f"{small_tensors.LIMIT_ENV}={self.small_tensor_bytes}, --num_handlers {handlers}, "
                f"{batching_pool.ENV}={self.env()[batching_pool.ENV]}")  # fmt: skip

    def env(self) -> dict[str, str]:
        """The environment every server gets on top of this process's."""
        return {batching_pool.ENV: str(self.batching).lower()}

    def slug(self) -> str:
        return (f"threads-{self.torch_threads or 'default'}-small-{self.small_tensor_bytes}"
                f"-handlers-{self.num_handlers or 'default'}-batching-{self.batching}")  # fmt: skip


@dataclass
class Stack:
    """What one run starts: the swarm, the services, the raw client; stopped by ``stop``, whatever happened."""

    model: BenchModel
    logs: Path
    servers: ServerSettings
    model_dir: Path | None = None
    swarm: PrivateSwarm | None = None
    services: list[ServiceProcess] = field(default_factory=list)
    raw: RawProcess | None = None
    cold_start_s: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        """Start everything one after the other, timing each part's cold start to ready."""
        self.model_dir = self.model.build()
        self.swarm = PrivateSwarm(self.model_dir, self.model.blocks, self.logs / "swarm", dht_prefix=DHT_PREFIX,
                                  torch_threads=self.servers.torch_threads,
                                  num_handlers=self.servers.num_handlers, env=self.servers.env())  # fmt: skip
        self.cold_start_s["swarm (2 servers, to all Started)"] = timed(lambda: self.swarm.start(240))
        inference = inference_process(
            model_dir=self.model_dir,
            initial_peers=self.swarm.initial_peers,
            dht_prefix=DHT_PREFIX,
            port=pick_free_port(),
            log_path=self.logs / "inference.log",
            extra_env=INFERENCE_ENV,
        )
        self.cold_start_s["inference (to /readyz 200)"] = self._timed_start(inference, 240)
        replicas = {inference.name: inference.base_url}
        gateway = gateway_process(
            replicas=replicas, port=pick_free_port(), log_path=self.logs / "gateway.log", extra_env=GATEWAY_ENV
        )
        self.cold_start_s["gateway (to /readyz 200)"] = self._timed_start(gateway, 120)
        ui = ui_process(port=pick_free_port(), log_path=self.logs / "ui.log")
        self.cold_start_s["ui (to /readyz 200)"] = self._timed_start(ui, 120)
        self.services.remove(ui)
        ui.stop()  # not needed for the measurements
        started = time.perf_counter()
        self.raw = RawProcess("bench.concurrency:ConcurrentRawClient", self.model_dir, self.swarm.initial_peers,
                              self.logs / "raw-client.log")  # fmt: skip
        self.cold_start_s["raw Petals client (own process, model loaded)"] = time.perf_counter() - started

    def _timed_start(self, service: ServiceProcess, timeout_s: float) -> float:
        """Start a service; seconds from process start to ``/readyz`` 200 (polled every 0.25 s)."""
        self.services.append(service)
        return timed(lambda: service.start_ready(timeout_s))

    def load_functions(self) -> dict[str, LoadFn]:
        from transformers import AutoTokenizer

        inference, gateway = self.services
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        prompt_tokens = lambda prompt: len(tokenizer(prompt, add_special_tokens=False)["input_ids"])  # noqa: E731
        return {
            "raw": raw_load(self.raw),
            "v1 per-token": threaded_load(v1_per_token_session(inference.base_url, prompt_tokens)),
            "stream": threaded_load(stream_session(inference.base_url)),
            "gateway stream": threaded_load(stream_session(gateway.base_url)),
        }

    def process_groups(self) -> dict[str, list[int]]:
        """The process groups of each CPU_SETS entry."""
        return {
            "bench": [os.getpgid(0)],
            "svc": [service.process.pid for service in self.services],
            "swarm": [server.process.pid for server in self.swarm.servers],
        }

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        if self.raw is not None:
            self.raw.close()
        if self.swarm is not None:
            self.swarm.stop()


def print_header(args: argparse.Namespace, model: BenchModel, servers: ServerSettings) -> None:
    print(f"\n=== {model.name}\nmachine: {machine_description()}")
    print(f"swarm: {len(model.blocks)} Petals servers (blocks {', '.join(model.blocks)}) on loopback, "
          f"--attn_cache_tokens 32768, {servers.describe(len(model.blocks))}; "
          f"model: {model.description}, float32 on the servers, CPU; client-side layers (raw and "
          f"inference alike): {default_dtype('cpu')}")  # fmt: skip
    print(f"services: inference {INFERENCE_ENV}, gateway {GATEWAY_ENV} (2 workers); HTTP clients: http.client")
    print(
        "Petals clients: the raw one is the bare library (with the petals_compat deadlock fix); the inference "
        "service's also packs its step requests with services/inference/step_packing.py"
    )
    print(f"workload: N concurrent sessions x {args.tokens} greedy tokens, different prompts, {args.rounds} "
          f"rounds, client order rotating; load average at end {load_average()}")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="tokens each session generates (default 32)")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16, 32], help="concurrent sessions")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per session count (default 3)")
    parser.add_argument("--clients", nargs="+", choices=CLIENTS, default=list(CLIENTS), help="(raw always runs)")
    parser.add_argument("--run-timeout", type=float, default=300.0, help="seconds one run may take (default 300)")
    parser.add_argument("--log-dir", type=Path, help="keep the processes' logs here (default: a temporary directory)")
    add_models_argument(parser)
    parser.add_argument("--small-tensor-bytes", type=int, nargs="+", default=[small_tensors.DEFAULT_LIMIT_BYTES],
                        help=f"the servers' {small_tensors.LIMIT_ENV}, one whole run each; 0: torch's shared "
                        f"memory for every tensor (default {small_tensors.DEFAULT_LIMIT_BYTES})")  # fmt: skip
    parser.add_argument("--server-threads", type=int, nargs="+", default=[SERVER_TORCH_THREADS],
                        help="torch threads of every Petals server process, one whole run each; 0: torch's "
                        f"default, one per core, the old setting (default {SERVER_TORCH_THREADS})")  # fmt: skip
    parser.add_argument("--server-handlers", type=int, nargs="+", default=[0],
                        help="the servers' --num_handlers (connection-handler processes), one whole run each; "
                        f"0: one per CPU per server, the launcher's default; {PETALS_NUM_HANDLERS}: Petals' "
                        "default, as before (default 0)")  # fmt: skip
    parser.add_argument("--batching", nargs="+", choices=(OFF, ON), default=[OFF, ON],
                        help=f"the servers' {batching_pool.ENV}, one whole run each, then off vs on side by side; "
                        "the raw client with batching off is the stock baseline (default: off on)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.tokens < 2 or args.rounds < 1 or min(args.sessions) < 1 or max(args.sessions) > 32:
        parser.error("--tokens must be at least 2, --rounds at least 1, --sessions between 1 and 32")
    if min(args.small_tensor_bytes) < 0 or min(args.server_threads) < 0 or min(args.server_handlers) < 0:
        parser.error("--small-tensor-bytes, --server-threads and --server-handlers must be at least 0")
    return args


def main(argv: list[str] | None = None) -> None:
    """Per model: the in-process limit, then one whole run per server setting (each its own swarm and
    services, measured and reported), then batching off against on."""
    args = parse_args(argv)
    clients = [name for key, name in CLIENTS.items() if key == "raw" or key in args.clients]
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # deprecation noise
    signal.signal(signal.SIGTERM, exit_on_sigterm)  # e.g. from `timeout`: still stop what we started
    print(f"machine: {machine_description()}; load average at start {load_average()}", flush=True)
    for name in args.models:
        model = BENCH_MODELS[name]
        in_process = in_process_limits(model, args)
        for threads, limit, handlers in itertools.product(args.server_threads, args.small_tensor_bytes,
                                                          args.server_handlers):  # fmt: skip
            runs = {}
            for batching in args.batching:
                servers = ServerSettings(threads or None, limit, handlers or None, batching == ON)
                print(f"\n=== {name}, {servers.describe(len(model.blocks))}", flush=True)
                runs[batching] = measure_model(model, servers, clients, args)
            print(f"\n=== {name}: batching off vs on, load average at end {load_average()}")
            report_batching(runs, args.sessions, clients, in_process)


def in_process_limits(model: BenchModel, args: argparse.Namespace) -> dict[int, float]:
    """Tokens/s of transformers ``generate`` at batch N in one process, for each N (none if it fails)."""
    limits = {}
    for count in args.sessions:
        try:
            limits[count] = measure_in_process(
                model.build(), count, args.tokens, available_cpus(), IN_PROCESS_TIMEOUT_S
            )
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            print(f"{model.name}: in-process limit at batch {count}: not measured ({error})", flush=True)
            continue
        print(f"{model.name}: in-process limit at batch {count}: {limits[count]:.1f} tokens/s "
              f"({available_cpus()} torch threads; load average {load_average()})", flush=True)  # fmt: skip
    return limits


def measure_model(model: BenchModel, servers: ServerSettings, clients: list[str], args: argparse.Namespace) -> Runs:
    """One whole run: its own swarm and services, the measurements, the report; the runs."""
    os.environ[small_tensors.LIMIT_ENV] = str(servers.small_tensor_bytes)  # the swarm's servers inherit it
    with tempfile.TemporaryDirectory(prefix="petals-chat-bench-") as work_dir:
        logs = (args.log_dir or Path(work_dir)) / f"{model.name}-{servers.slug()}"
        stack = Stack(model, logs, servers)
        try:
            stack.start()
            functions = stack.load_functions()
            runs = measure({name: functions[name] for name in clients}, args, stack.process_groups())
            print_header(args, model, servers)
            print("\ncold start to ready (s):")
            print_table([(name, f"{seconds:.1f}") for name, seconds in stack.cold_start_s.items()])
            print()
            report(runs, args.sessions, clients)
            report_outputs(runs, clients)
            return runs
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
