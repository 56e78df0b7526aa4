"""The replica's Petals client step with and without step_packing, A/B in one process, rounds alternating.

One private swarm of the tiny BLOOM (2 servers) and one Petals client in this process, generating
exactly as the inference service does (``SwarmStepper.generate``, greedy, token by token). For each
number of concurrent sessions (``--sessions``, one thread each) and each of ``--rounds`` rounds, the
sessions run once with Petals' own request packing and once with services/inference/step_packing.py
installed, the order reversing from round to round. Per (N, packing): tokens/s and the CPU this
process used per token (user + system, every thread: the client's Python, its event-loop thread;
not its p2pd), the ratio of the latter to Petals' packing's, and whether every output equals.
Run: ``.venv/bin/python -m bench.client_step [--sessions 1 8 16] [--rounds 6] [--tokens 64]``.
"""

from __future__ import annotations

import argparse
import logging
import resource
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import load_average, machine_description, prompt_for
from bench.inference_latency import CLIENT_OPTIONS, DHT_PREFIX  # sets HF_HUB_OFFLINE first
from bench.load_results import print_table
from services.inference import petals_compat, step_packing
from services.inference.settings import default_dtype
from services.inference.swarm_stepper import SwarmStepper
from services.swarm.launcher import PrivateSwarm
from services.swarm.tiny_bloom import ensure_tiny_bloom

PACKINGS = ("Petals' own", "step_packing")


@dataclass
class Totals:
    """One (N, packing)'s rounds summed."""

    tokens: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)


class Client:
    """The tiny BLOOM's Petals client, as the replica loads it (model, tokenizer, sessions)."""

    def __init__(self, model_dir: Path, peers: list[str]) -> None:
        import torch
        from petals import AutoDistributedModelForCausalLM
        from transformers import AutoTokenizer

        logging.getLogger("petals.client").setLevel(logging.WARNING)  # no "Route found" line per session
        petals_compat.install()  # as the service does (a deadlock fix)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dtype = getattr(torch, default_dtype("cpu"))
        self.model = AutoDistributedModelForCausalLM.from_pretrained(
            model_dir, initial_peers=peers, dht_prefix=DHT_PREFIX, torch_dtype=dtype, **CLIENT_OPTIONS
        ).eval()
        self.stepper = SwarmStepper(self)

    def open_petals_session(self, max_length: int) -> Any:
        from petals.client.inference_session import InferenceSession

        return InferenceSession(self.model.transformer.h.sequence_manager, max_length=max_length)

    def session(self, prompt: str, tokens: int) -> list[int]:
        """One session's greedy tokens after ``prompt``."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with self.open_petals_session(len(ids) + tokens) as petals_session:
            return list(self.stepper.generate(petals_session, ids, tokens, None))

    def load(self, count: int, tokens: int) -> tuple[float, float, list[list[int]]]:
        """``count`` concurrent sessions: (wall seconds, CPU seconds of this process, outputs)."""
        outputs: list[list[int]] = [[] for _ in range(count)]

        def run(index: int) -> None:
            outputs[index] = self.session(prompt_for(index), tokens)

        threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
        started, cpu = time.perf_counter(), _cpu_s()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started, _cpu_s() - cpu, outputs

    def close(self) -> None:
        sequence_manager = self.model.transformer.h.sequence_manager
        sequence_manager.shutdown()
        sequence_manager.dht.shutdown()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Packing:
    """Switches ``petals.client.inference_session`` between Petals' packing and step_packing's."""

    def __init__(self) -> None:
        import petals.client.inference_session as inference_session

        self._module = inference_session
        fast = step_packing.replacements(inference_session)
        self._sets = {PACKINGS[0]: {name: getattr(inference_session, name) for name in fast}, PACKINGS[1]: fast}

    def use(self, packing: str) -> None:
        for name, value in self._sets[packing].items():
            setattr(self._module, name, value)


def measure(client: Client, args: argparse.Namespace) -> dict[tuple[int, str], Totals]:
    packing, totals = Packing(), {}
    for count in args.sessions:
        packing.use(PACKINGS[1])
        client.load(count, args.tokens)  # warm-up, not measured
        for round_index in range(args.rounds):
            order = PACKINGS if round_index % 2 == 0 else PACKINGS[::-1]
            for name in order:
                packing.use(name)
                wall_s, cpu_s, outputs = client.load(count, args.tokens)
                total = totals.setdefault((count, name), Totals())
                total.tokens += sum(map(len, outputs))
                total.wall_s, total.cpu_s = total.wall_s + wall_s, total.cpu_s + cpu_s
                total.outputs.extend(outputs)
                print(f"  N={count:<3} round {round_index + 1}/{args.rounds} {name:12} "
                      f"{sum(map(len, outputs)) / wall_s:7.1f} tokens/s", flush=True)  # fmt: skip
    return totals


def report(totals: dict[tuple[int, str], Totals], counts: list[int]) -> None:
    rows = [("N", "packing", "tokens", "tokens/s", "CPU ms/token", "x CPU", "outputs equal")]
    for count in counts:
        base = totals[(count, PACKINGS[0])]
        for name in PACKINGS:
            total = totals[(count, name)]
            cpu_ms = 1000 * total.cpu_s / total.tokens
            rows.append((str(count), name, str(total.tokens), f"{total.tokens / total.wall_s:.1f}", f"{cpu_ms:.3f}",
                         f"{total.cpu_s / total.tokens / (base.cpu_s / base.tokens):.3f}",
                         "yes" if total.outputs == base.outputs else "NO"))  # fmt: skip
    print_table(rows)
    print("CPU ms/token: this process (the client's threads, all of them), per generated token; x CPU: to Petals' own")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 8, 16], help="concurrent sessions")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per packing and session count (default 6)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens each session generates (default 64)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    print(f"machine: {machine_description()}; load average at start {load_average()}")
    print(f"swarm: tiny BLOOM, 2 Petals servers on loopback; client in this process, {default_dtype('cpu')}; "
          f"N sessions x {args.tokens} greedy tokens, {args.rounds} rounds, order alternating")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-client-step-") as work_dir:
        model_dir = ensure_tiny_bloom()
        with PrivateSwarm(model_dir, ("0:2", "2:4"), Path(work_dir), dht_prefix=DHT_PREFIX) as swarm:
            client = Client(model_dir, swarm.initial_peers)
            try:
                totals = measure(client, args)
            finally:
                client.close()
    print(f"load average at end {load_average()}")
    report(totals, args.sessions)


if __name__ == "__main__":
    main()
