"""Per-token latency: raw Petals client vs the inference HTTP API vs the gateway in front of it.

For each model (``--models``: the offline tiny BLOOM on 2 servers "0:2" and "2:4", SmolLM2-135M on
"0:15" and "15:30"), one run starts a private swarm on loopback, one inference service and one
gateway (gunicorn) on it, and the raw Petals client in a process of its own
(bench/raw_process.py) on the same swarm. The same prompt is generated
greedily in two modes, for ``--rounds`` rounds, the three clients taking turns within each round
(the order rotating) so drift hits all alike:

- one token per request (the seed UI style): open a session, send the prompt with
  max_new_tokens=1, then continue with max_new_tokens=1 up to ``--tokens`` tokens; each
  continuation call is one sample (steady-state per-token latency);
- one request for N tokens: one generate call without a session; sample = total / tokens.

One unmeasured warm-up round runs first; the services run as deployed. Figures are printed, never
asserted, against the target "the service adds under 5% (or under 3 ms) per token".
Run: ``.venv/bin/python -m bench.inference_latency [--tokens 32] [--rounds 5]`` (or ``make bench``).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import signal
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # this and everything below is imported after HF_HUB_OFFLINE is set: the hub reads it at import

from bench.common import BENCH_MODELS, BenchModel, add_models_argument, exit_on_sigterm, machine_description
from bench.raw_process import RawProcess
from client.api import Api
from deploy.local_stack import ServiceProcess, gateway_process, inference_process, pick_free_port
from services.inference import petals_compat
from services.inference.settings import default_dtype
from services.swarm.launcher import PrivateSwarm

PROMPT = "The quick brown fox jumps over the lazy dog, and then"
DHT_PREFIX = "petals-chat-bench"
# The service's Petals client options at their defaults (services/inference/settings.py), so both
# clients retry and time out alike; Petals' own default is to retry forever.
CLIENT_OPTIONS = {"max_retries": 4, "request_timeout": 60.0, "update_period": 30.0}
CLIENTS = ("raw", "inference", "gateway")
Samples = dict[str, list[float]]  # client -> seconds per token


class RawClient:
    """The Petals client, generating exactly as the service does (run in its own process: RawProcess)."""

    def __init__(self, model_dir: Path, peers: list[str]) -> None:
        from petals import AutoDistributedModelForCausalLM
        from transformers import AutoTokenizer

        logging.getLogger("petals.client").setLevel(logging.WARNING)  # no "Route found" line per session
        petals_compat.install()  # as the service does: without it the client can deadlock (see the module)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # The service's default dtype for this CPU (bfloat16 where it has AMX, else float32), so that
        # both compute the same logits and their outputs can be compared token for token.
        dtype = getattr(torch, default_dtype("cpu"))
        self.model = AutoDistributedModelForCausalLM.from_pretrained(
            model_dir, initial_peers=peers, dht_prefix=DHT_PREFIX, torch_dtype=dtype, **CLIENT_OPTIONS
        )
        self.ids = torch.tensor([self.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])

    def prompt_tokens(self) -> int:
        return self.ids.shape[1]

    def _generate(self, inputs: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.generate(inputs, do_sample=False, pad_token_id=self.tokenizer.pad_token_id, **kwargs)

    def per_token_calls(self, tokens: int) -> list[float]:
        """Mode a: seconds of each max_new_tokens=1 call after the prompt's."""
        from petals.client.inference_session import InferenceSession

        session = InferenceSession(self.model.transformer.h.sequence_manager, max_length=self.ids.shape[1] + tokens)
        try:
            self._generate(self.ids, session=session, max_new_tokens=1)
            return [_timed(lambda: self._generate(None, session=session, max_new_tokens=1)) for _ in range(tokens - 1)]
        finally:
            session.close()

    def one_request(self, tokens: int) -> tuple[float, str, int]:
        """Mode b: (seconds, decoded new text, tokens generated) of one generate call."""
        start = time.perf_counter()
        output = self._generate(self.ids, max_new_tokens=tokens)
        elapsed = time.perf_counter() - start
        new_ids = output[0, self.ids.shape[1] :].tolist()
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return elapsed, text, len(new_ids)

    def close(self) -> None:
        """Leave the swarm (routing thread, DHT process) so the process can exit."""
        sequence_manager = self.model.transformer.h.sequence_manager
        sequence_manager.shutdown()
        sequence_manager.dht.shutdown()


class ServiceClient:
    """The v1 HTTP API (of the inference service or the gateway) through the lean client tests share
    (client/api.py: the standard library's http.client, so the figures show what the service adds)."""

    def __init__(self, base_url: str, prompt_tokens: int) -> None:
        self.api = Api(base_url, timeout_s=120)
        self.prompt_tokens = prompt_tokens

    def generate(self, **fields: Any) -> str:
        """POST generate (greedy) and return the new text."""
        return self.api.call("POST", "generate", {"do_sample": 0, **fields})["outputs"]

    def per_token_calls(self, tokens: int) -> list[float]:
        """Mode a: seconds of each max_new_tokens=1 request after the prompt's."""
        session_id = self.api.open_session(self.prompt_tokens + tokens)
        try:
            self.generate(inputs=PROMPT, max_new_tokens=1, session_id=session_id)
            step = lambda: self.generate(max_new_tokens=1, session_id=session_id)  # noqa: E731
            return [_timed(step) for _ in range(tokens - 1)]
        finally:
            self.api.close_session(session_id)

    def one_request(self, tokens: int) -> tuple[float, str, int]:
        """Mode b: (seconds, new text, -1: tokens unknown) of one generate request without a session."""
        start = time.perf_counter()
        text = self.generate(inputs=PROMPT, max_new_tokens=tokens)
        return time.perf_counter() - start, text, -1


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure(clients: dict[str, Any], tokens: int, rounds: int) -> tuple[Samples, Samples, bool]:
    """Warm-up + ``rounds`` rounds: mode a samples, mode b samples, whether mode b outputs all match."""
    per_call: Samples = {name: [] for name in clients}
    one_shot: Samples = {name: [] for name in clients}
    match = True
    orders = itertools.cycle(itertools.permutations(clients))
    for index in range(-1, rounds):  # round -1 is the warm-up
        results = {
            name: (clients[name].per_token_calls(tokens), clients[name].one_request(tokens)) for name in next(orders)
        }
        if index < 0:
            continue
        _, raw_text, generated = results["raw"][1]
        match = match and all(results[name][1][1] == raw_text for name in clients)
        for name, (calls, (seconds, *_)) in results.items():
            per_call[name] += calls
            one_shot[name].append(seconds / max(generated, 1))  # greedy: all generated the same tokens
        print(f"round {index + 1}/{rounds} done ({generated} tokens in one request)", flush=True)
    return per_call, one_shot, match


def _ms(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples) * 1000, statistics.fmean(samples) * 1000


def report(model: BenchModel, modes: dict[str, Samples], match: bool, tokens: int, rounds: int) -> None:
    """Print the machine facts, the comparison table and the verdicts against the targets."""
    print(f"\n=== {model.name}\nmachine: {machine_description()}")
    print(f"swarm: {len(model.blocks)} Petals servers (blocks {', '.join(model.blocks)}) on loopback; "
          f"model: {model.description}, float32 on the servers, CPU; client-side layers (raw and inference "
          f"alike): {default_dtype('cpu')}")  # fmt: skip
    print(f"workload: greedy, {tokens} tokens, {rounds} rounds, clients taking turns; figures in ms per token")
    rows = [("mode", "client", "n", "p50", "mean", "p50/raw", "+ms p50 vs raw", "+ms p50 vs inference")]
    verdicts = []
    for mode, samples in modes.items():
        (raw_p50, _), (inf_p50, _) = _ms(samples["raw"]), _ms(samples["inference"])
        for name in CLIENTS:
            p50, mean = _ms(samples[name])
            hop = f"{p50 - inf_p50:+.2f}" if name == "gateway" else ""
            rows.append((mode, name, str(len(samples[name])), f"{p50:.2f}", f"{mean:.2f}", f"{p50 / raw_p50:.3f}",
                         f"{p50 - raw_p50:+.2f}", hop))  # fmt: skip
        gateway_p50 = _ms(samples["gateway"])[0]
        service_met = inf_p50 / raw_p50 < 1.05 or inf_p50 - raw_p50 < 3.0
        gateway_met = gateway_p50 - inf_p50 < 2.0
        verdicts.append(f"{mode}: inference adds <5% or <3 ms: {'MET' if service_met else 'NOT MET'}; "
                        f"gateway hop adds <2 ms: {'MET' if gateway_met else 'NOT MET'}")  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(*(cell.rjust(width) for cell, width in zip(row, widths, strict=True)), sep="  ")
    print(*verdicts, sep="\n")
    print(f"one-request outputs of all three clients (greedy): {'MATCH' if match else 'MISMATCH'}")


def main(argv: list[str] | None = None) -> None:
    """Start the swarm and the service, measure, report, stop everything."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per measurement (default 32)")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    add_models_argument(parser)
    args = parser.parse_args(argv)
    if args.tokens < 2 or args.rounds < 1:
        parser.error("--tokens must be at least 2 and --rounds at least 1")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # deprecation noise
    signal.signal(signal.SIGTERM, exit_on_sigterm)  # e.g. from `timeout`: still stop what we started
    for name in args.models:
        measure_model(BENCH_MODELS[name], args)


def measure_model(model: BenchModel, args: argparse.Namespace) -> None:
    """One model's run: its own swarm, service, gateway and raw client; measure, report, stop."""
    model_dir = model.build()
    with tempfile.TemporaryDirectory(prefix="petals-chat-bench-") as work_dir:
        swarm = PrivateSwarm(model_dir, model.blocks, Path(work_dir) / "swarm", dht_prefix=DHT_PREFIX)
        services: list[ServiceProcess] = []
        raw = None
        try:
            print("starting the swarm...", flush=True)
            swarm.start()
            inference = inference_process(
                model_dir=model_dir,
                initial_peers=swarm.initial_peers,
                dht_prefix=DHT_PREFIX,
                port=pick_free_port(),
                log_path=Path(work_dir) / "inference.log",
            )
            services.append(inference.start())
            print("loading the raw client, starting the services...", flush=True)
            raw = RawProcess("bench.inference_latency:RawClient", model_dir, swarm.initial_peers,
                             Path(work_dir) / "raw-client.log")  # fmt: skip
            inference.wait_ready(180)
            gateway = gateway_process(
                replicas={inference.name: inference.base_url},
                port=pick_free_port(),
                log_path=Path(work_dir) / "gateway.log",
            )
            services.append(gateway.start())
            gateway.wait_ready(60)
            prompt_tokens = raw.prompt_tokens()
            clients = {
                "raw": raw,
                "inference": ServiceClient(inference.base_url, prompt_tokens),
                "gateway": ServiceClient(gateway.base_url, prompt_tokens),
            }
            per_call, one_shot, match = measure(clients, args.tokens, args.rounds)
            modes = {"a: 1 token/request": per_call, f"b: 1 request/{args.tokens} tokens": one_shot}
            report(model, modes, match, args.tokens, args.rounds)
        finally:
            for service in reversed(services):
                service.stop()
            if raw is not None:
                raw.close()
            swarm.stop()


if __name__ == "__main__":
    main()
