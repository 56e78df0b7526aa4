"""Structured output on SmolLM2 through the gateway: validity over many schemas, and the cost per token.

Starts a private SmolLM2 swarm (2 servers, "0:15" and "15:30"), one inference replica and a gateway
(or uses ``--url``, e.g. ``make run``'s gateway), then:

- ``schemas``: ``--count`` (default 200) chat requests through the official ``openai`` client, each
  with ``response_format`` ``json_schema`` (strict) of one of client/schemas.py's varied schemas
  (nested objects, arrays, enums, bounded numbers, required and optional fields), sampled at
  temperature 0.7 with the request's index as seed, up to ``--max-tokens`` (1024, the replicas'
  default limit) each, ``--concurrency`` (8) at a time; prints how
  many answers parse as JSON and validate against their schema (``jsonschema``), the finish
  reasons, and each failure's index (a request the swarm fails, a 502, is retried up to 3 times).
- ``cost``: at one session, v2 streams of ``--tokens`` tokens through the gateway, unconstrained and
  constrained (a schema whose documents are longer than that), alternating for ``--rounds``
  rounds; per token, the median time between consecutive tokens as the client sees them, both side
  by side with the constrained run's overhead. (The mask's own cost on both vocabularies, in
  process: bench/grammar_libraries.py.)

Figures are printed, never asserted. Run: ``.venv/bin/python -m bench.structured_output [--count 200]
[--phases schemas,cost] [--url http://127.0.0.1:5000]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import jsonschema
import openai

from bench.common import exit_on_sigterm, load_average, machine_description
from client.api import Api
from client.schemas import schemas, strict_format
from deploy.local_stack import gateway_process, inference_process, pick_free_port
from services.swarm.launcher import PrivateSwarm
from services.swarm.smollm2 import ensure_smollm2

DHT_PREFIX = "petals-chat-smollm2"
# Each chat request leaves its conversation session open for a follow-up; at most 10 of them, the least
# recently used evicted first, so that their attention caches fit the servers' (8 requests at a time).
REPLICA_ENV = {"TORCH_DTYPE": "float32", "MAX_SESSIONS": "10"}
COST_PROMPT = "<|im_start|>user\nList some numbers.<|im_end|>\n<|im_start|>assistant\n"


@contextmanager
def smollm2_gateway(logs: Path) -> Iterator[str]:
    """A gateway in front of one SmolLM2 replica on a private swarm: its base URL."""
    model_dir = ensure_smollm2()
    with PrivateSwarm(model_dir, ["0:15", "15:30"], logs / "swarm", dht_prefix=DHT_PREFIX) as swarm:
        replica = inference_process(model_dir=model_dir, initial_peers=swarm.initial_peers, dht_prefix=DHT_PREFIX,
                                    port=pick_free_port(), log_path=logs / "inference.log",
                                    extra_env=REPLICA_ENV).start_ready(240)  # fmt: skip
        try:
            gateway = gateway_process(replicas={replica.name: replica.base_url}, port=pick_free_port(),
                                      log_path=logs / "gateway.log", name="gateway").start_ready(60)  # fmt: skip
            try:
                yield gateway.base_url
            finally:
                gateway.stop()
        finally:
            replica.stop()


def run_schemas(base_url: str, model: str, count: int, concurrency: int, max_tokens: int) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=3, timeout=1800)

    def one(index: int, schema: dict) -> tuple[str, int, str | None]:
        """The finish reason, the tokens, and why the answer is not valid (None: it is)."""
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Fill in this form with plausible values."}],
            response_format={"type": "json_schema", "json_schema": strict_format(index, schema)},
            temperature=0.7, seed=index, max_tokens=max_tokens,
        )  # fmt: skip
        choice = answer.choices[0]
        try:
            jsonschema.validate(json.loads(choice.message.content), schema)
            problem = None
        except (ValueError, jsonschema.ValidationError) as error:
            problem = f"#{index} ({choice.finish_reason}): {str(error)[:100]}"
        return choice.finish_reason, answer.usage.completion_tokens, problem

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(count), schemas(count)))
    seconds = time.perf_counter() - start
    failures = [problem for _, _, problem in results if problem]
    finishes = Counter(reason for reason, _, _ in results)
    print(f"schemas: {count - len(failures)}/{count} answers parse and validate; finish reasons {dict(finishes)}; "
          f"{sum(tokens for _, tokens, _ in results)} tokens in {seconds:.0f} s ({concurrency} at a time)")  # fmt: skip
    for failure in failures:
        print(f"  failed {failure}")


def _inter_token_seconds(api: Api, body: dict) -> float:
    """The median time between consecutive tokens of one v2 stream, as the client sees them."""
    times: list[float] = []
    status, events = api.events(body)
    for event, _ in events:
        if event == "token":
            times.append(time.perf_counter())
    if status != 200 or len(times) < 2:
        raise RuntimeError(f"the stream failed (HTTP {status})")
    return statistics.median(b - a for a, b in itertools.pairwise(times))


def run_cost(base_url: str, model: str, tokens: int, rounds: int) -> None:
    api = Api(base_url)
    long_array = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
                  "minItems": tokens, "maxItems": tokens}  # fmt: skip
    body = {"inputs": COST_PROMPT, "max_new_tokens": tokens, "model": model}
    runs: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
    _inter_token_seconds(api, body)  # warm-up: the replica builds the grammar tokenizer on first use
    _inter_token_seconds(api, {**body, "json_schema": long_array})
    for _ in range(rounds):
        runs["unconstrained"].append(_inter_token_seconds(api, body))
        runs["constrained"].append(_inter_token_seconds(api, {**body, "json_schema": long_array}))
    free, constrained = (statistics.median(runs[name]) for name in ("unconstrained", "constrained"))
    print(f"cost at 1 session, {tokens} tokens, {rounds} rounds (median of the per-stream medians):")
    print(f"  unconstrained {free * 1e3:7.2f} ms/token   constrained {constrained * 1e3:7.2f} ms/token   "
          f"overhead {(constrained / free - 1) * 100:+.1f} %")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8, help="schemas: requests at a time")
    parser.add_argument("--max-tokens", type=int, default=1024, help="schemas: each answer's limit")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--phases", default="schemas,cost", help="comma-separated: schemas, cost")
    parser.add_argument("--url", default=None, help="an existing gateway serving SmolLM2 (default: start one)")
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)  # stop the stack it started
    print(f"{machine_description()}; load {load_average()}")
    model, phases = ensure_smollm2().name, set(args.phases.split(","))
    with (
        tempfile.TemporaryDirectory(prefix="bench-structured-") as scratch,
        _gateway(args.url, args.log_dir or Path(scratch)) as base_url,
    ):
        if "schemas" in phases:
            run_schemas(base_url, model, args.count, args.concurrency, args.max_tokens)
        if "cost" in phases:
            run_cost(base_url, model, args.tokens, args.rounds)


@contextmanager
def _gateway(url: str | None, logs: Path) -> Iterator[str]:
    if url is not None:
        yield url
        return
    with smollm2_gateway(logs) as base_url:
        yield base_url


if __name__ == "__main__":
    main()
