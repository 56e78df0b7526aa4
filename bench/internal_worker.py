"""The internal services' gunicorn worker, A/B: the hardened gthread worker against gunicorn's stock one.

Only the gateway is public; the replicas are reached through it, the ui through it or the Ingress
controller. Here each
internal service runs twice at once: one copy with the worker its config names
(services/common/gunicorn/gthread_worker.py), one with gunicorn's stock ``gthread``
(``GUNICORN_CMD_ARGS=--worker-class gthread``, which overrides the config file; each copy's log
says which worker it uses), the inference copies on one private swarm of the tiny BLOOM. Loads,
``--rounds`` rounds each after a warm-up, the two copies' order alternating from round to round:

- ``ui page``: ``--connections`` keep-alive connections at once, each ``--requests`` GETs of the chat page;
- ``inference v1``: ``--sessions`` sessions at once of ``--tokens`` one-token v1 requests (the seed UI's style);
- ``inference stream``: ``--sessions`` SSE streams at once of ``--tokens`` tokens.

Per load and worker: requests (or tokens) per second, the stock/hardened ratio and its range over
single rounds, the median time between a client's consecutive answers, and the service's CPU ms
per request (its process group, from /proc) with its ratio. The machine's other processes share
the cores: the cores they used meanwhile are printed too.
Run: ``.venv/bin/python -m bench.internal_worker [--rounds 6] [--sessions 16] [--tokens 32]
[--connections 16] [--requests 200] [--loads "ui page" "inference v1" "inference stream"]``.
"""

from __future__ import annotations

import argparse
import http.client
import signal
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from bench.common import exit_on_sigterm, load_average, machine_description
from bench.concurrency import (
    INFERENCE_ENV,
    OTHERS,
    SETTLE_S,
    LoadFn,
    LoadResult,
    SessionFn,
    measured_load,
    print_table,
    stream_session,
    summarize,
    threaded_load,
    v1_per_token_session,
)
from bench.inference_latency import DHT_PREFIX
from deploy.local_stack import ServiceProcess, inference_process, pick_free_port, ui_process
from services.swarm.launcher import PrivateSwarm
from services.swarm.tiny_bloom import ensure_tiny_bloom

WORKERS = {"hardened": {}, "stock": {"GUNICORN_CMD_ARGS": "--worker-class gthread"}}  # name: service env
BLOCKS = ("0:2", "2:4")
RUN_TIMEOUT_S = 300.0
LOADS = ("ui page", "inference v1", "inference stream")


def page_session(base_url: str) -> SessionFn:
    """GETs of the chat page on one kept-alive connection; each answer counts as one "token"."""
    address = urlsplit(base_url)

    def run(prompt: str, requests: int, answer_times: list[float]) -> str:
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
        try:
            for _ in range(requests):
                connection.request("GET", "/")
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")
                answer_times.append(time.perf_counter())
        finally:
            connection.close()
        return ""

    return run


Load = tuple[dict[str, LoadFn], dict[str, int], int, int]  # per worker: load, service pgid; clients; per client


def measure(load: Load, rounds: int) -> dict[str, list[LoadResult]]:
    """A warm-up, then ``rounds`` rounds, the workers' order alternating."""
    functions, pgids, clients, per_client = load
    groups = {worker: [pgid] for worker, pgid in pgids.items()}
    for function in functions.values():
        function(min(clients, 4), min(per_client, 8), RUN_TIMEOUT_S)
    results: dict[str, list[LoadResult]] = {worker: [] for worker in functions}
    for index in range(rounds):
        order = list(functions) if index % 2 == 0 else list(reversed(functions))
        for worker in order:
            time.sleep(SETTLE_S)
            result = measured_load(functions[worker], clients, per_client, RUN_TIMEOUT_S, groups)
            results[worker].append(result)
            print(f"  round {index + 1}/{rounds} {worker:<8} {result.tokens / result.wall_s:8.1f}/s, "
                  f"{len(result.errors)} errors", flush=True)  # fmt: skip
    return results


def report(name: str, results: dict[str, list[LoadResult]]) -> list[tuple[str, ...]]:
    """Table rows of one load: each worker's figures and its ratio to the first worker's."""
    base_worker, *_ = results
    base = summarize(results[base_worker])
    base_cpu = _cpu_ms_per_unit(results[base_worker], base_worker)
    rows = []
    for worker, runs in results.items():
        row, cpu = summarize(runs), _cpu_ms_per_unit(runs, worker)
        pairs = zip(runs, results[base_worker], strict=True)
        rounds = [(r.tokens / r.wall_s) / (b.tokens / b.wall_s) for r, b in pairs]
        others = sum(r.cpu_s[OTHERS] for r in runs) / row.wall_s
        rows.append((name, worker, str(row.tokens), f"{row.rate:.1f}", f"{row.rate / base.rate:.3f}",
                     f"{min(rounds):.2f}-{max(rounds):.2f}", f"{row.p50_ms:.2f}", f"{cpu:.3f}",
                     f"{cpu / base_cpu:.3f}", str(row.errors), f"{others:.2f}"))  # fmt: skip
    return rows


def _cpu_ms_per_unit(runs: list[LoadResult], worker: str) -> float:
    units = sum(r.tokens for r in runs)
    return sum(r.cpu_s[worker] for r in runs) * 1000 / units if units else float("nan")


HEADER = ("load", "worker", "answers", "per s", "x hardened", "x per round", "p50 gap ms", "CPU ms/answer",
          "x CPU", "errors", "others")  # fmt: skip
LEGEND = """\
answers: requests (ui page) or tokens (inference); x per round: lowest-highest ratio over single rounds;
CPU ms/answer: the service's CPU (master and workers) per answer; others: cores every other process used meanwhile"""


def start_services(
    logs: Path, swarm: PrivateSwarm, model_dir: Path, started: list[ServiceProcess]
) -> dict[str, dict[str, ServiceProcess]]:
    """Both copies of each internal service (service -> worker -> process), appended to ``started`` as
    they start (for the caller to stop)."""
    copies: dict[str, dict[str, ServiceProcess]] = {"ui": {}, "inference": {}}
    for worker, env in WORKERS.items():
        copies["ui"][worker] = ui_process(port=pick_free_port(), log_path=logs / f"ui-{worker}.log", extra_env=env)
        copies["inference"][worker] = inference_process(
            model_dir=model_dir, initial_peers=swarm.initial_peers, dht_prefix=DHT_PREFIX, port=pick_free_port(),
            log_path=logs / f"inference-{worker}.log", replica_id=f"inference-{worker}",
            extra_env={**INFERENCE_ENV, **env},
        )  # fmt: skip
        for service in (copies["ui"][worker], copies["inference"][worker]):
            started.append(service)
            service.start_ready(240)
            print(f"{service.log_path.stem}: {_worker_line(service.log_path)}", flush=True)
    return copies


def _worker_line(log_path: Path) -> str:
    """gunicorn's own word on the worker class it runs."""
    return next((line for line in log_path.read_text().splitlines() if "Using worker" in line), "(not logged)")


def loads(args: argparse.Namespace, copies: dict[str, dict[str, ServiceProcess]], model_dir: Path) -> dict[str, Load]:
    """Each load's functions per worker, the process group of the copy it loads, and its size."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_tokens: Callable[[str], int] = lambda prompt: len(tokenizer(prompt, add_special_tokens=False)["input_ids"])  # noqa: E731
    ui, inference = copies["ui"], copies["inference"]
    pgids = {service: {worker: copy.process.pid for worker, copy in copies[service].items()} for service in copies}
    return {
        "ui page": ({w: threaded_load(page_session(ui[w].base_url)) for w in WORKERS}, pgids["ui"],
                    args.connections, args.requests),
        "inference v1": ({w: threaded_load(v1_per_token_session(inference[w].base_url, prompt_tokens))
                          for w in WORKERS}, pgids["inference"], args.sessions, args.tokens),
        "inference stream": ({w: threaded_load(stream_session(inference[w].base_url)) for w in WORKERS},
                             pgids["inference"], args.sessions, args.tokens),
    }  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=16, help="ui: kept-alive connections at once")
    parser.add_argument("--requests", type=int, default=200, help="ui: GETs per connection")
    parser.add_argument("--sessions", type=int, default=16, help="inference: sessions at once")
    parser.add_argument("--tokens", type=int, default=32, help="inference: tokens per session")
    parser.add_argument("--loads", nargs="+", choices=LOADS, default=list(LOADS), help="loads to run (default: all)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    warnings.filterwarnings("ignore")
    print(machine_description(), f"load average {load_average()}", sep="; ", flush=True)
    started: list[ServiceProcess] = []
    swarm = None
    with tempfile.TemporaryDirectory(prefix="bench-internal-worker-") as logs:
        try:
            model_dir = ensure_tiny_bloom()
            swarm = PrivateSwarm(model_dir, BLOCKS, Path(logs) / "swarm", dht_prefix=DHT_PREFIX).start(240)
            copies = start_services(Path(logs), swarm, model_dir, started)
            rows: list[tuple[str, ...]] = [HEADER]
            all_loads = loads(args, copies, model_dir)
            for name in args.loads:
                print(f"{name}:", flush=True)
                rows += report(name, measure(all_loads[name], args.rounds))
            print_table(rows)
            print(LEGEND, f"load average at the end {load_average()}", sep="\n")
        finally:
            for service in reversed(started):
                service.stop()
            if swarm is not None:
                swarm.stop()


if __name__ == "__main__":
    main()
