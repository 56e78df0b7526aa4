"""Where the CPU goes with continuous batching on: per process, per layout, and (with py-spy) per code path.

For each layout (``--layouts``: block ranges per server, torch threads per server, ``--num_handlers``)
one whole stack of bench/concurrency.py with SWARM_BATCHING=true measures ``--sessions`` concurrent
stream sessions on the inference service (one warm-up, then ``--rounds`` rounds) and prints tokens/s
and the CPU per token of each kind of process: each server's main process (the runtime: the blocks'
compute, the pool), its forks (connection handlers: hivemind RPC, (de)serialization; the DHT), its
p2pd daemons (libp2p transport), the inference service's worker. With ``--py-spy PATH`` (a py-spy
binary; not a dependency of the project), the last round is also sampled: server 0's processes and
the inference service's, each sample filed under the first category (CATEGORIES) that a frame of its
stack matches, leaf first.
Run: ``.venv/bin/python -m bench.batching_profile [--layouts 0:15,15:30/1/0 0:30/1/0] [--py-spy PATH]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

from bench.common import BENCH_MODELS, load_average, machine_description
from bench.concurrency import ServerSettings, Stack, measured_load
from bench.load_results import print_table
from services.swarm import small_tensors

CATEGORIES = (  # (category, substrings of a frame "function (file:line)"), the first match wins, leaf first
    ("blocks' compute", ("batched_blocks", "torch/nn/", "modeling_llama", "modeling_bloom", "block_functions",
                         "petals/server/backend", "memory_cache")),
    ("(de)serialization", ("serializ", "compression", "protobuf", "pickle")),
    ("pool, queues", ("batching_pool", "task_pool", "multiprocessing", "queue")),
    ("hivemind/Petals RPC", ("hivemind/p2p", "petals/server/handler", "hivemind/moe", "hivemind/utils")),
    ("asyncio", ("asyncio",)),
    ("replica: LM head, sampling", ("lm_head", "sampling", "logits", "decoding")),
    ("replica: Petals client", ("petals/client",)),
    ("replica: HTTP, service", ("services/inference", "gunicorn", "falcon")),
)  # fmt: skip


def process_kind(pid: int, pgid: int, comm: str) -> str:
    """What a process of a server's or a service's group is: the leader, one of its forks, p2pd, other."""
    if comm == "p2pd":
        return "p2pd"
    if comm.startswith("python"):
        return "main" if pid == pgid else "forks"
    return comm


def cpu_by_process(groups: dict[str, list[int]]) -> Counter[str]:
    """CPU seconds so far per "set kind" (e.g. "swarm p2pd") of the live processes of the named groups."""
    ticks = os.sysconf("SC_CLK_TCK")
    owner = {pgid: name for name, pgids in groups.items() for pgid in pgids}
    totals: Counter[str] = Counter()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, fields = text[text.index("(") + 1 : text.rindex(")")], text.rsplit(")", 1)[1].split()
        if (name := owner.get(int(fields[2]))) is not None:
            kind = process_kind(int(stat.parent.name), int(fields[2]), comm)
            totals[f"{name} {kind}"] += (int(fields[11]) + int(fields[12])) / ticks
    return totals


def categorize(collapsed: str) -> Counter[str]:
    """Samples per CATEGORIES entry of py-spy's raw (collapsed) output ("frame;frame;... count" lines)."""
    counts: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")[::-1]
        category = next(
            (name for frame in frames for name, keys in CATEGORIES if any(k in frame for k in keys)), "other"
        )
        counts[category] += int(count)
    return counts


def record(py_spy: str, pid: int, seconds: float, output: Path) -> subprocess.Popen:
    """Start sampling ``pid`` and its subprocesses for ``seconds``, without pausing them."""
    command = [py_spy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--format", "raw",
               "--rate", "50", "--duration", str(int(seconds)), "--output", str(output)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def parse_layout(text: str) -> tuple[tuple[str, ...], int, int]:
    """``0:15,15:30/1/0``: block ranges, torch threads per server, --num_handlers (0: the launcher's default)."""
    blocks, threads, handlers = text.split("/")
    return tuple(blocks.split(",")), int(threads), int(handlers)


def measure_layout(text: str, args: argparse.Namespace, work_dir: Path) -> None:
    """One layout's stack: warm-up, rounds, the CPU split, the profile."""
    blocks, threads, handlers = parse_layout(text)
    model = dataclasses.replace(BENCH_MODELS[args.model], blocks=blocks)
    servers = ServerSettings(threads, small_tensors.DEFAULT_LIMIT_BYTES, handlers or None, batching=True)
    stack = Stack(model, work_dir / text.replace("/", "_").replace(",", "+"), servers)
    try:
        stack.start()
        load = stack.load_functions()["stream"]
        groups = {"swarm": [s.process.pid for s in stack.swarm.servers], "inference": [stack.services[0].process.pid]}
        load(args.sessions, 4, 300.0)
        for index in range(args.rounds):
            profiling = args.py_spy and index == args.rounds - 1
            spies = [record(args.py_spy, pid, args.spy_seconds, work_dir / f"{name}.raw")
                     for name, pid in (("server0", groups["swarm"][0]), ("inference", groups["inference"][0]))
                     ] if profiling else []  # fmt: skip
            before = cpu_by_process(groups)
            result = measured_load(load, args.sessions, args.tokens, 300.0, stack.process_groups())
            used = cpu_by_process(groups)
            used.subtract(before)
            report_round(text, servers.describe(len(blocks)), result, used, index)
            for spy in spies:
                spy.wait(args.spy_seconds + 60)
        if args.py_spy:
            report_profiles(work_dir)
    finally:
        stack.stop()


def report_round(layout: str, describe: str, result, used: Counter[str], index: int) -> None:
    """Tokens/s and ms of CPU per token per process kind."""
    tokens = result.tokens or 1
    print(f"\nlayout {layout} ({describe}), round {index + 1}: {result.tokens / result.wall_s:.1f} tokens/s, "
          f"{len(result.errors)} errors, other processes {result.cpu_s['others'] / result.wall_s:.2f} cores, "
          f"load average {load_average()}")  # fmt: skip
    rows = [("process", "CPU ms/token")] + [
        (kind, f"{seconds * 1000 / tokens:.1f}") for kind, seconds in sorted(used.items())
    ]
    rows.append(("all of these", f"{sum(used.values()) * 1000 / tokens:.1f}"))
    print_table(rows)


def report_profiles(work_dir: Path) -> None:
    """Each profile's share of samples per category."""
    for name in ("server0", "inference"):
        path = work_dir / f"{name}.raw"
        if not path.exists():
            print(f"{name}: no profile")
            continue
        counts = categorize(path.read_text())
        total = sum(counts.values()) or 1
        print(f"\npy-spy {name} (all its processes, {total} samples): share of CPU samples")
        print_table([(category, f"{count / total:.1%}") for category, count in counts.most_common()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=BENCH_MODELS, default="smollm2-135m-instruct")
    parser.add_argument(
        "--layouts", nargs="+", default=["0:15,15:30/1/0", "0:30/1/0", "0:15,15:30/2/0", "0:15,15:30/1/2"]
    )
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--py-spy", help="a py-spy binary: profile the last round")
    parser.add_argument("--spy-seconds", type=float, default=20.0)
    args = parser.parse_args()
    print(f"machine: {machine_description()}; load average {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="petals-chat-profile-") as work_dir:
        for layout in args.layouts:
            measure_layout(layout, args, Path(work_dir))


if __name__ == "__main__":
    main()
