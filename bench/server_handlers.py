"""The Petals servers' ``--num_handlers``, A/B: several swarms alive together, rounds alternating.

A whole benchmark run per setting (``bench.concurrency --server-handlers 8 0``) lets the machine's
drift between the runs decide the comparison: on this project's shared 2-core machine, runs a few
minutes apart differ by 10-20 %. Here one private swarm of the tiny BLOOM (2 servers, "0:2" and
"2:4") per ``--num-handlers`` value runs at the same time, each with a raw Petals client in a process
of its own (bench/raw_process.py); for each number of concurrent sessions (``--sessions``) and each of
``--rounds`` rounds, every swarm's client runs that many sessions of ``--tokens`` greedy tokens in
turn, the order reversing from round to round. An idle swarm uses almost no CPU (printed: ``idle
swarms``). Per (N, setting): tokens/s, its ratio to the first setting's, the range of that ratio over
single rounds, the swarm's CPU per token, and whether every output equals the first setting's.
Run: ``.venv/bin/python -m bench.server_handlers [--num-handlers 8 0] [--sessions 1 16 32] [--rounds 8]``.
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import exit_on_sigterm, load_average, machine_description
from bench.concurrency import measured_load, raw_load
from bench.inference_latency import DHT_PREFIX
from bench.load_results import LoadResult, print_table
from bench.raw_process import RawProcess
from services.swarm.launcher import PETALS_NUM_HANDLERS, PrivateSwarm, handlers_per_server
from services.swarm.tiny_bloom import ensure_tiny_bloom

BLOCKS = ("0:2", "2:4")


@dataclass
class Contender:
    """One setting's swarm, its raw client and its results per session count."""

    handlers: int
    swarm: PrivateSwarm
    raw: RawProcess | None = None
    results: dict[int, list[LoadResult]] = field(default_factory=dict)

    def label(self) -> str:
        return f"--num_handlers {self.handlers}"


def start(handlers: list[int], work_dir: Path) -> list[Contender]:
    """A swarm and a raw client per setting (0: the launcher's default, one handler per CPU per server)."""
    model_dir = ensure_tiny_bloom()
    contenders: list[Contender] = []
    try:
        for value in handlers:
            count = value or handlers_per_server(len(BLOCKS))
            swarm = PrivateSwarm(model_dir, BLOCKS, work_dir / f"swarm-{len(contenders)}", dht_prefix=DHT_PREFIX,
                                 num_handlers=count)  # fmt: skip
            contenders.append(Contender(count, swarm))
            swarm.start(240)
            contenders[-1].raw = RawProcess("bench.concurrency:ConcurrentRawClient", model_dir, swarm.initial_peers,
                                            work_dir / f"raw-{len(contenders)}.log")  # fmt: skip
    except BaseException:
        stop(contenders)
        raise
    return contenders


def stop(contenders: list[Contender]) -> None:
    for contender in contenders:
        if contender.raw is not None:
            contender.raw.close()
        contender.swarm.stop()


def measure(contenders: list[Contender], args: argparse.Namespace) -> None:
    """A warm-up per swarm, then ``args.rounds`` rounds per session count, the order reversing each round."""
    groups = {str(i): [server.process.pid for server in c.swarm.servers] for i, c in enumerate(contenders)}
    for contender in contenders:
        raw_load(contender.raw)(4, 8, args.run_timeout)
    for count in args.sessions:
        for round_index in range(args.rounds):
            order = contenders if round_index % 2 == 0 else contenders[::-1]
            for contender in order:
                result = measured_load(raw_load(contender.raw), count, args.tokens, args.run_timeout, groups)
                contender.results.setdefault(count, []).append(result)
                rate = result.tokens / result.wall_s
                print(f"  N={count:<3} round {round_index + 1}/{args.rounds} {contender.label():18} "
                      f"{rate:7.2f} tokens/s, {len(result.errors)} errors", flush=True)  # fmt: skip


def report(contenders: list[Contender], counts: list[int]) -> None:
    """One row per (N, setting); ratios to the first setting."""
    first = contenders[0]
    rows = [("N", "servers' setting", "tokens/s", f"x {first.label()}", "x per round", "swarm CPU ms/token",
             "idle swarms ms/token", "errors", "outputs = first's")]  # fmt: skip
    for count in counts:
        base = first.results[count]
        for index, contender in enumerate(contenders):
            results = contender.results[count]
            tokens = sum(r.tokens for r in results)
            rate = tokens / sum(r.wall_s for r in results)
            base_rate = sum(r.tokens for r in base) / sum(r.wall_s for r in base)
            per_round = [(r.tokens / r.wall_s) / (b.tokens / b.wall_s) for r, b in zip(results, base, strict=True)]
            own = sum(r.cpu_s[str(index)] for r in results)
            idle = sum(s for r in results for name, s in r.cpu_s.items() if name.isdigit() and name != str(index))
            same = [s.text for r in results for s in r.sessions] == [s.text for r in base for s in r.sessions]
            rows.append((str(count), contender.label(), f"{rate:.1f}", f"{rate / base_rate:.3f}",
                         f"{min(per_round):.2f}-{max(per_round):.2f}", f"{1000 * own / tokens:.2f}",
                         f"{1000 * idle / tokens:.2f}", str(sum(len(r.errors) for r in results)),
                         "yes" if same else "NO"))  # fmt: skip
    print_table(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-handlers", type=int, nargs="+", default=[PETALS_NUM_HANDLERS, 0],
                        help=f"settings to compare; 0: one per CPU per server, the launcher's default "
                        f"(default {PETALS_NUM_HANDLERS} 0: Petals' default against ours)")  # fmt: skip
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 16, 32], help="concurrent sessions")
    parser.add_argument("--rounds", type=int, default=8, help="measured rounds per session count (default 8)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens each session generates (default 32)")
    parser.add_argument("--run-timeout", type=float, default=300.0, help="seconds one run may take (default 300)")
    args = parser.parse_args(argv)
    if len(args.num_handlers) < 2 or min(args.num_handlers) < 0:
        parser.error("--num-handlers needs at least two values, each at least 0")
    if args.tokens < 2 or args.rounds < 1 or min(args.sessions) < 1 or max(args.sessions) > 32:
        parser.error("--tokens must be at least 2, --rounds at least 1, --sessions between 1 and 32")
    return args


def main(argv: list[str] | None = None) -> None:
    """Start a swarm and a raw client per setting, measure them in alternation, report, stop everything."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    print(f"machine: {machine_description()}; load average at start {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="petals-chat-bench-") as work_dir:
        contenders = start(args.num_handlers, Path(work_dir))
        try:
            measure(contenders, args)
        finally:
            stop(contenders)
    print(f"\ntiny BLOOM, 2 servers per swarm (blocks {', '.join(BLOCKS)}), one torch thread per server process; "
          f"{args.rounds} rounds of N sessions x {args.tokens} greedy tokens of the raw Petals client per swarm, "
          f"alternating; load average at end {load_average()}")  # fmt: skip
    report(contenders, args.sessions)


if __name__ == "__main__":
    main()
