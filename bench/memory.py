"""Memory over long runs: every process's RSS over many session cycles, and where the replica's worker grows.

Starts a private swarm of one embedded model (default SmolLM2-135M-Instruct: 2 servers, blocks 0:15
and 15:30), one inference replica and one gateway, then runs ``--cycles`` cycles through the
gateway (open a session, generate 1 or 2 tokens greedily, close it; ``--threads`` keep-alive
clients) after ``--warm-up`` cycles, and prints the RSS of each process (swarm servers and their
p2p daemons, the replica's master, worker and p2p daemon, the gateway's master and workers) every
``--every`` cycles, then the growth per cycle. With ``--trace`` the replica's worker runs
``tracemalloc`` from the end of the warm-up on (the debug hook ``services/common/gunicorn/memtrace.py``): a
snapshot then and one after each ``--every`` cycles, and the allocation sites that grew the most between the first
and the last (tracing slows the worker and inflates its RSS: compare RSS from a run without it).

Run: ``.venv/bin/python -m bench.memory [--cycles 5000] [--every 500] [--trace]`` (``make bench-memory``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.common import BENCH_MODELS, exit_on_sigterm, load_average, machine_description
from client.api import session_cycles
from client.probes import process_tree, rss_bytes, wait_until
from deploy.local_stack import ServiceProcess, gateway_process, inference_process, pick_free_port
from services.common.gunicorn import memtrace
from services.swarm.launcher import PrivateSwarm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DHT_PREFIX = "petals-chat-bench-memory"
MiB = 2**20


@dataclass(frozen=True)
class Watched:
    """The stack's process groups, by label: each a process whose tree is measured."""

    groups: dict[str, int]  # label -> root pid

    def rss(self) -> dict[str, int]:
        """``label/comm[pid]`` -> RSS in bytes, for every process of every tree."""
        figures = {}
        for label, root in self.groups.items():
            for pid in process_tree(root):
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                figures[f"{label}/{comm}[{pid}]"] = rss_bytes(pid)
        return figures


@contextmanager
def stack(model_name: str, logs: Path, trace_dir: Path | None) -> Iterator[tuple[ServiceProcess, Watched]]:
    """The swarm, a replica (tracing if ``trace_dir``) and a gateway; stopped on exit."""
    model = BENCH_MODELS[model_name]
    model_dir = model.build()
    with ExitStack() as stop:
        swarm = stop.enter_context(PrivateSwarm(model_dir, list(model.blocks), logs / "swarm", dht_prefix=DHT_PREFIX))
        env = {"READINESS_INTERVAL_SECONDS": "2", **({memtrace.DIR_ENV: str(trace_dir)} if trace_dir else {})}
        inference = inference_process(model_dir=model_dir, initial_peers=swarm.initial_peers, dht_prefix=DHT_PREFIX,
                                      port=pick_free_port(), log_path=logs / "inference.log",
                                      extra_env=env)  # fmt: skip
        stop.callback(inference.stop)
        inference.start_ready(300)
        gateway = gateway_process(replicas={inference.name: inference.base_url}, port=pick_free_port(),
                                  log_path=logs / "gateway.log")  # fmt: skip
        stop.callback(gateway.stop)
        gateway.start_ready(60)
        groups = {f"server-{i}": server.process.pid for i, server in enumerate(swarm.servers)}
        groups |= {"inference": inference.process.pid, "gateway": gateway.process.pid}
        yield gateway, Watched(groups)


def take_snapshot(worker_pid: int, trace_dir: Path) -> Path:
    """Ask the replica's worker for a tracemalloc snapshot and wait for its file."""
    count = len(list(trace_dir.glob("snapshot-*.pickle")))
    os.kill(worker_pid, signal.SIGUSR2)
    assert wait_until(lambda: len(list(trace_dir.glob("snapshot-*.pickle"))) > count, timeout=300)
    return sorted(trace_dir.glob("snapshot-*.pickle"))[-1]


def print_growth(first: Path, last: Path, cycles: int, top: int) -> None:
    """The allocation sites that grew the most between two snapshots, per line and per call stack."""
    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
    ]
    old, new = (tracemalloc.Snapshot.load(str(path)).filter_traces(ignore) for path in (first, last))
    total = sum(stat.size for stat in new.statistics("filename")) - sum(
        stat.size for stat in old.statistics("filename")
    )
    print(f"\ntraced Python memory: {total / 1024:+.1f} KiB over {cycles} cycles ({total / cycles:+.1f} B per cycle)")
    print(f"\ntop {top} lines by growth:")
    for stat in new.compare_to(old, "lineno")[:top]:
        print(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks  {stat.traceback[0]}")
    print(f"\ntop {min(top, 5)} call stacks by growth:")
    for stat in new.compare_to(old, "traceback")[: min(top, 5)]:
        print(f"  {stat.size_diff / 1024:+.1f} KiB {stat.count_diff:+d} blocks")
        for line in stat.traceback.format(most_recent_first=True):
            print(f"      {line}")


def print_rss(samples: list[tuple[int, dict[str, int]]]) -> None:
    """Each process's RSS at each sample, and its growth per cycle from the first sample to the last."""
    (first_cycle, first), (last_cycle, last) = samples[0], samples[-1]
    cycles = max(last_cycle - first_cycle, 1)
    print("\n| process | " + " | ".join(f"{cycle}" for cycle, _ in samples) + " | growth | per cycle |")
    print("| --- |" + " --- |" * (len(samples) + 2))
    for name in first:
        row = " | ".join(f"{figures.get(name, 0) / MiB:.1f}" for _, figures in samples)
        growth = last.get(name, 0) - first[name]
        print(f"| {name} | {row} | {growth / MiB:+.2f} MiB | {growth / cycles / 1024:+.2f} KiB |")


def measure(args: argparse.Namespace, logs: Path) -> None:
    trace_dir = logs / "tracemalloc" if args.trace else None
    if trace_dir:
        trace_dir.mkdir(parents=True, exist_ok=True)
    with stack(args.model, logs, trace_dir) as (gateway, watched):
        worker_pid = process_tree(watched.groups["inference"])[1]
        session_cycles(gateway.base_url, 0, args.warm_up, args.threads, max_length=32, timeout_s=120)
        time.sleep(2)
        if trace_dir:
            os.kill(worker_pid, signal.SIGUSR2)  # the first one starts tracing
            time.sleep(2)  # two signals in a row would be handled once
        snapshots = [take_snapshot(worker_pid, trace_dir)] if trace_dir else []
        samples, started, done = [(0, watched.rss())], time.monotonic(), 0
        while done < args.cycles:
            chunk = min(args.every, args.cycles - done)
            session_cycles(gateway.base_url, args.warm_up + done, chunk, args.threads, max_length=32, timeout_s=120)
            done += chunk
            time.sleep(2)  # let closed connections and sessions settle
            samples.append((done, watched.rss()))
            snapshots += [take_snapshot(worker_pid, trace_dir)] if trace_dir else []
            rate = done / (time.monotonic() - started)
            total = sum(samples[-1][1].values()) / MiB
            print(f"{done} cycles, {rate:.1f}/s, RSS of all processes {total:.1f} MiB, load {load_average()}; "
                  f"RSS {json.dumps(samples[-1][1])}", flush=True)  # fmt: skip
        print_rss(samples)
        if snapshots:
            print_growth(snapshots[0], snapshots[-1], args.cycles, args.top)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=BENCH_MODELS, default="smollm2-135m-instruct")
    parser.add_argument("--cycles", type=int, default=5000)
    parser.add_argument("--every", type=int, default=500, help="cycles between two RSS samples (and snapshots)")
    parser.add_argument("--warm-up", type=int, default=100)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--trace", action="store_true", help="tracemalloc in the replica's worker")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    logs = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-memory-"))
    tracing = "on" if args.trace else "off"
    print(f"{machine_description()}\nlogs: {logs}; model {args.model}; {args.cycles} cycles after {args.warm_up}, "
          f"{args.threads} clients; tracemalloc {tracing}; load {load_average()}", flush=True)  # fmt: skip
    measure(args, logs)


if __name__ == "__main__":
    main()
