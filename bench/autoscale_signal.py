"""Which replica metric tracks latency: the autoscaling signal, measured.

One private swarm of SmolLM2-135M (two servers, "0:15" and "15:30") on loopback and one inference
replica on it (``MAX_SESSIONS=--max-sessions``). ``--idle-sessions`` sessions are opened first and
held idle for the whole run (chat users reading an answer hold theirs). Then, for each step of
``--sessions`` (default 1 2 4 8 16 24), that many clients generate at once for ``--step-seconds``:
each opens a session of ``--session-length`` tokens and streams ``--tokens`` tokens at a time in it
(v2 ``generate_stream`` with ``session_id``) without pause. Meanwhile the replica's ``/metrics`` is
read every ``--sample-seconds``. The swarm's and the replica's times to ready are printed first (the replica's is
what a model scaled to zero waits for once its pod is scheduled and its image pulled).

Per step it prints the time per token (the gap between a session's consecutive ``token`` events,
first token of each request left out) at p50 and p99, tokens/s, and the mean of what an autoscaler
reads: ``petals_chat_session_utilization`` (sessions held / MAX_SESSIONS),
``petals_chat_requests_running`` and ``petals_chat_requests_waiting``; then how closely each one
follows the p50 (Pearson's r over the steps). Figures are printed, never asserted.
Run: ``.venv/bin/python -m bench.autoscale_signal [--sessions 1 2 4 8 16 24] [--step-seconds 20]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

from bench.common import BENCH_MODELS, exit_on_sigterm, load_average, machine_description
from client.api import Api, CallFailed
from deploy.local_stack import ServiceProcess, inference_process, pick_free_port
from services.swarm.launcher import PrivateSwarm

DHT_PREFIX = "petals-chat-bench-autoscale"
MODEL = BENCH_MODELS["smollm2-135m-instruct"]
SIGNALS = {  # column -> the replica's metric
    "share": "petals_chat_session_utilization",
    "running": "petals_chat_requests_running",
    "waiting": "petals_chat_requests_waiting",
}
WARMUP_S = 2.0  # the first seconds of a step are left out: every client is still opening its session


@dataclass
class Step:
    """What one step of the ramp measured."""

    sessions: int
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive tokens of one request
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in SIGNALS})


def start_stack(work: Path, max_sessions: int) -> tuple[PrivateSwarm, ServiceProcess]:
    """The swarm, then the replica, each timed to ready (the replica's is a scaled-to-zero model's cold start)."""
    model_dir = MODEL.build()
    began = time.perf_counter()
    swarm = PrivateSwarm(model_dir, list(MODEL.blocks), work / "swarm", dht_prefix=DHT_PREFIX).start(600)
    swarm_s, began = time.perf_counter() - began, time.perf_counter()
    env = {"MAX_SESSIONS": str(max_sessions), "MAX_SESSIONS_PER_CLIENT": "0", "GUNICORN_THREADS": "64"}
    replica = inference_process(model_dir=model_dir, initial_peers=swarm.initial_peers, dht_prefix=DHT_PREFIX,
                                port=pick_free_port(), log_path=work / "inference.log", extra_env=env)  # fmt: skip
    replica.start().wait_ready(600)
    print(f"swarm ready in {swarm_s:.1f} s; replica ready (process start to /readyz 200) in "
          f"{time.perf_counter() - began:.1f} s")  # fmt: skip
    return swarm, replica


def read_signals(api: Api) -> dict[str, float]:
    """The replica's current value of each signal (0 for one it does not show)."""
    values = dict.fromkeys(SIGNALS, 0.0)
    for line in api.metrics().splitlines():
        name, _, value = line.partition(" ")
        for column, metric in SIGNALS.items():
            if name == metric:
                values[column] = float(value)
    return values


def client(base_url: str, index: int, args: argparse.Namespace, step: Step, started: float,
           stop: threading.Event) -> None:  # fmt: skip
    """One session generating ``--tokens`` at a time until ``stop`` (or its room is used up); its gaps between the
    warm-up and ``stop`` go to ``step`` (a request in flight at ``stop`` finishes unrecorded)."""
    api, tokens = Api(base_url, timeout_s=300), args.tokens
    try:
        session_id = api.open_session(args.session_length)
        body = {"session_id": session_id, "inputs": f"Story {index}: once upon a time", "max_new_tokens": tokens}
        used = 0
        while not stop.is_set() and used + tokens + 32 < args.session_length:
            last = None
            status, events = api.events(body)
            for event, data in events:
                if status != 200 or event == "error":
                    raise CallFailed(f"HTTP {status}: {event} {data}")
                now = time.perf_counter()
                if event == "token":
                    if last is not None and now - started > WARMUP_S and not stop.is_set():  # within the window
                        step.gaps.append(now - last)
                        step.tokens += 1
                    last = now
            used += tokens + 16
            body = {"session_id": session_id, "max_new_tokens": tokens}
        api.close_session(session_id)
    except (CallFailed, OSError) as error:
        step.errors.append(str(error)[:160])
    finally:
        api.close()


def run_step(base_url: str, sessions: int, args: argparse.Namespace) -> Step:
    step, stop, started = Step(sessions), threading.Event(), time.perf_counter()
    threads = [threading.Thread(target=client, args=(base_url, i, args, step, started, stop), daemon=True)
               for i in range(sessions)]  # fmt: skip
    for thread in threads:
        thread.start()
    sampler = Api(base_url)
    while time.perf_counter() - started < args.step_seconds:
        time.sleep(args.sample_seconds)
        if time.perf_counter() - started > WARMUP_S:
            for column, value in read_signals(sampler).items():
                step.samples[column].append(value)
    stop.set()
    for thread in threads:
        thread.join(300)
    return step


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def correlation(xs: list[float], ys: list[float]) -> float:
    """Pearson's r (nan when either side does not vary)."""
    try:
        return statistics.correlation(xs, ys)
    except statistics.StatisticsError:
        return float("nan")


def report(steps: list[Step], args: argparse.Namespace) -> None:
    print(f"\nOne SmolLM2 replica, MAX_SESSIONS={args.max_sessions}, {args.idle_sessions} idle sessions held, "
          f"{args.tokens} tokens per request, sessions of {args.session_length} tokens, {args.step_seconds:.0f} s "
          "per step")  # fmt: skip
    print(f"{'sessions':>8} {'p50 ms':>7} {'p99 ms':>7} {'tok/s':>6} {'share':>6} {'running':>8} {'waiting':>8} "
          f"{'errors':>6}")  # fmt: skip
    for step in steps:
        mean = {column: statistics.fmean(values) if values else 0.0 for column, values in step.samples.items()}
        rate = step.tokens / max(args.step_seconds - WARMUP_S, 1e-9)
        p50, p99 = 1000 * percentile(step.gaps, 0.5), 1000 * percentile(step.gaps, 0.99)
        print(f"{step.sessions:>8} {p50:>7.1f} {p99:>7.1f} {rate:>6.1f} {mean['share']:>6.3f} "
              f"{mean['running']:>8.2f} {mean['waiting']:>8.2f} {len(step.errors):>6}")  # fmt: skip
        for error in step.errors[:2]:
            print("   error:", error)
    p50s = [percentile(step.gaps, 0.5) for step in steps]
    for column, metric in SIGNALS.items():
        means = [statistics.fmean(step.samples[column]) if step.samples[column] else 0.0 for step in steps]
        print(f"r(p50, {metric}) = {correlation(p50s, means):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8, 16, 24])
    parser.add_argument("--idle-sessions", type=int, default=8, help="sessions held idle through the run")
    parser.add_argument("--max-sessions", type=int, default=48, help="the replica's MAX_SESSIONS")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per streamed request")
    parser.add_argument("--session-length", type=int, default=512,
                        help="max_length of each generating session (the servers' attention cache, 32,768 tokens, "
                             "holds sessions x this)")  # fmt: skip
    parser.add_argument("--step-seconds", type=float, default=20.0)
    parser.add_argument("--sample-seconds", type=float, default=0.5, help="how often /metrics is read")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    print(machine_description(), "| load", load_average())
    with tempfile.TemporaryDirectory(prefix="bench-autoscale-") as work:
        swarm, replica = start_stack(Path(work), args.max_sessions)
        try:
            idle = Api(replica.base_url)
            held = [idle.open_session(64) for _ in range(args.idle_sessions)]
            run_step(replica.base_url, 1, argparse.Namespace(**{**vars(args), "step_seconds": 5.0}))  # warm-up
            steps = [run_step(replica.base_url, sessions, args) for sessions in args.sessions]
            report(steps, args)
            for session_id in held:
                idle.close_session(session_id)
        finally:
            replica.stop()
            swarm.stop()
    print("load", load_average())


if __name__ == "__main__":
    main()
