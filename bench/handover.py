"""A scale-in under load, and what handing a session over costs.

One private swarm of SmolLM2-135M (two servers, "0:15" and "15:30") on loopback, two inference
replicas that hand sessions to each other (``INFERENCE_PEERS``, ``HANDOVER_TOKEN``) and a gateway.

1. Handover time per session: sessions holding about 100, 500 and 1,000 tokens (``--sizes``) are
   opened through the gateway; the replica holding the most of them gets SIGTERM; its log's
   ``handover:`` lines give each session's time (sent, rebuilt on the swarm by the adopter,
   answered; four at a time), by size.
2. A scale-in under load: ``--clients`` v1 sessions ask one token per request without pause through
   the gateway while a replica gets SIGTERM and leaves; per-token latency (one request, one token)
   before, during (SIGTERM to exit) and after, and the errors (any answer that is not ``ok``).

Figures are printed, never asserted. Run: ``.venv/bin/python -m bench.handover [--clients 8]``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

from bench.common import BENCH_MODELS, exit_on_sigterm, load_average, machine_description
from client.api import Api, CallFailed
from deploy.local_stack import (
    ServiceProcess,
    gateway_process,
    handover_env,
    inference_process,
    pick_free_port,
    write_discovery_file,
)
from services.swarm.launcher import PrivateSwarm

DHT_PREFIX = "petals-chat-bench-handover"
TOKEN = "bench-handover-token-0123456789"
MODEL = BENCH_MODELS["smollm2-135m-instruct"]


def start_stack(work: Path) -> tuple[PrivateSwarm, list[ServiceProcess], ServiceProcess]:
    model_dir = MODEL.build()
    swarm = PrivateSwarm(model_dir, list(MODEL.blocks), work / "swarm", dht_prefix=DHT_PREFIX).start(600)
    peers = {f"bench-{index}": f"http://127.0.0.1:{pick_free_port()}" for index in range(2)}
    discovery = work / "inference-replicas.txt"
    write_discovery_file(discovery, peers)
    handover = {**handover_env(discovery, TOKEN), "HANDOVER_LINGER_SECONDS": "2", "READINESS_INTERVAL_SECONDS": "1"}
    replicas = [
        inference_process(
            model_dir=model_dir, initial_peers=swarm.initial_peers, dht_prefix=DHT_PREFIX,
            port=int(url.rpartition(":")[2]), log_path=work / f"{name}.log", replica_id=name,
            extra_env=handover,
        ).start()
        for name, url in peers.items()
    ]  # fmt: skip
    for replica in replicas:
        replica.wait_ready(600)
    urls, poll = {r.name: r.base_url for r in replicas}, {"REPLICA_POLL_INTERVAL_SECONDS": "0.5"}
    gateway = gateway_process(replicas=urls, port=pick_free_port(), log_path=work / "gateway.log", extra_env=poll)
    gateway.start_ready(120)
    return swarm, replicas, gateway


def prompt_of(tokens: int) -> str:
    """A text of about ``tokens`` tokens of the model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL.build())
    ids = tokenizer(" The quick brown fox jumps over the lazy dog." * (tokens // 8 + 2)).input_ids[: tokens - 1]
    return tokenizer.decode(ids)


def handover_times(gateway: ServiceProcess, replicas: list[ServiceProcess], sizes: list[int], per_size: int) -> None:
    api = Api(gateway.base_url, timeout_s=300)
    sessions = []
    for size in sizes:
        for _ in range(per_size):
            session_id = api.open_session(size + 64)
            api.call("POST", "generate", {"session_id": session_id, "inputs": prompt_of(size), "max_new_tokens": 1})
            sessions.append(session_id)
    holder = max(replicas, key=lambda r: sum(s.startswith(r.name + ".") for s in sessions))
    start = holder.log_path.stat().st_size
    began = time.perf_counter()
    holder.stop(timeout=120)
    stopped = time.perf_counter() - began
    log = holder.log_path.read_bytes()[start:].decode(errors="replace")
    times: dict[int, list[float]] = {}
    for tokens, seconds in re.findall(r"handover: (\d+) tokens to \S+ in ([\d.]+) s", log):
        size = min(sizes, key=lambda s: abs(s - int(tokens)))
        times.setdefault(size, []).append(float(seconds))
    print(f"\n1. Handover time per session (SIGTERM to {holder.name}; 4 sessions at a time; exit after {stopped:.1f} s "
          "including HANDOVER_LINGER_SECONDS=2)")  # fmt: skip
    print(f"{'tokens':>8} {'sessions':>9} {'median s':>9} {'max s':>7}")
    for size in sizes:
        found = times.get(size, [])
        if found:
            print(f"{size:>8} {len(found):>9} {statistics.median(found):>9.3f} {max(found):>7.3f}")
    print(re.findall(r"handed over .*", log)[-1:])
    for session_id in sessions:
        api.answer("GET", "close_inference_session", {"session_id": session_id})
    holder.start_ready(600)


def scale_in_under_load(gateway: ServiceProcess, replicas: list[ServiceProcess], clients: int, phase_s: float) -> None:
    samples: list[tuple[float, float]] = []  # (when it ended, seconds)
    errors: list[tuple[float, str]] = []
    stop = threading.Event()

    def client(index: int) -> None:
        api = Api(gateway.base_url, timeout_s=120)
        session_id = api.open_session(2048)
        fields = {"session_id": session_id, "max_new_tokens": 1, "inputs": f"Client {index}: Once upon a time"}
        while not stop.is_set():
            began = time.perf_counter()
            try:
                api.call("POST", "generate", fields)
                samples.append((time.perf_counter(), time.perf_counter() - began))
            except CallFailed as error:
                errors.append((time.perf_counter(), str(error)[:120]))
            fields = {"session_id": session_id, "max_new_tokens": 1}
            if len(samples) > 100_000:
                break

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(phase_s)
    t_term = time.perf_counter()
    leaving = replicas[-1]
    leaving.stop(timeout=120)
    t_gone = time.perf_counter()
    time.sleep(phase_s)
    stop.set()
    for thread in threads:
        thread.join(60)
    print(f"\n2. Scale-in under load: {clients} v1 sessions, one token per request; SIGTERM to {leaving.name}, "
          f"which left after {t_gone - t_term:.1f} s")  # fmt: skip
    print(f"{'phase':>8} {'tokens':>7} {'p50 ms':>7} {'p95 ms':>7} {'max ms':>7} {'errors':>7}")
    for name, low, high in (("before", 0, t_term), ("during", t_term, t_gone), ("after", t_gone, float("inf"))):
        phase = sorted(s for t, s in samples if low <= t < high)
        failed = sum(low <= t < high for t, _ in errors)
        if phase:
            p95 = phase[min(len(phase) - 1, int(0.95 * len(phase)))]
            print(f"{name:>8} {len(phase):>7} {1000 * statistics.median(phase):>7.1f} {1000 * p95:>7.1f} "
                  f"{1000 * phase[-1]:>7.1f} {failed:>7}")  # fmt: skip
    for _, message in errors[:5]:
        print("  error:", message)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--per-size", type=int, default=4, help="sessions of each size")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--phase-seconds", type=float, default=15.0, help="load before and after the scale-in")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    print(machine_description(), "| load", load_average())
    with tempfile.TemporaryDirectory(prefix="bench-handover-") as work:
        swarm, replicas, gateway = start_stack(Path(work))
        try:
            handover_times(gateway, replicas, args.sizes, args.per_size)
            time.sleep(3)  # the gateway sees the restarted replica
            scale_in_under_load(gateway, replicas, args.clients, args.phase_seconds)
        finally:
            for service in (gateway, *replicas):
                service.stop()
            swarm.stop()
    print("load", load_average())


if __name__ == "__main__":
    main()
