"""The cost of ``n`` choices: separate Petals sessions (what the OpenAI API does) against one Petals
session holding all ``n`` hypotheses as a batch (the sharing Petals allows).

One private swarm per model and one Petals client in this process. Per round, the same ``n``
sampled continuations of one prompt are generated both ways, the order alternating:

- separate: ``n`` sessions, one thread each (as the gateway starts ``n`` generations at once and a
  replica runs each in a thread of its own): every session sends the prompt through the swarm;
- shared: one session of batch ``n`` (``generate`` on the prompt repeated ``n`` times): one round
  trip per step for all ``n``. Petals' servers size a session's attention cache by its first step's
  batch (``_update_cache_inplace`` views the new keys by the cache's batch), so the prompt is still
  computed ``n`` times: ``hypo_ids`` can copy a hypothesis's cache, not prefill a batch from one row.

Printed per model: the median wall seconds of each way, and the ratio.
Run: ``.venv/bin/python -m bench.choices [--models tiny-bloom smollm2-135m-instruct] [--n 4] [--tokens 32]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.common import BENCH_MODELS, add_models_argument, load_average, machine_description
from bench.inference_latency import CLIENT_OPTIONS, DHT_PREFIX, PROMPT  # sets HF_HUB_OFFLINE first
from services.inference import petals_compat
from services.swarm.launcher import PrivateSwarm


class Client:
    """A Petals client of the model: sampled generation in sessions of its own."""

    def __init__(self, model_dir: Path, peers: list[str]) -> None:
        import torch
        from petals import AutoDistributedModelForCausalLM
        from transformers import AutoTokenizer

        logging.getLogger("petals.client").setLevel(logging.WARNING)
        petals_compat.install()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoDistributedModelForCausalLM.from_pretrained(
            model_dir, initial_peers=peers, dht_prefix=DHT_PREFIX, torch_dtype=torch.float32, **CLIENT_OPTIONS
        )
        self.ids = torch.tensor([tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])
        self.pad = tokenizer.pad_token_id

    def generate(self, batch: int, tokens: int) -> None:
        """``batch`` continuations of the prompt in one session."""
        import torch
        from petals.client.inference_session import InferenceSession

        session = InferenceSession(self.model.transformer.h.sequence_manager, max_length=self.ids.shape[1] + tokens)
        try:
            with torch.inference_mode():
                self.model.generate(self.ids.repeat(batch, 1), do_sample=True, max_new_tokens=tokens,
                                    min_new_tokens=tokens, pad_token_id=self.pad, session=session)  # fmt: skip
        finally:
            session.close()

    def close(self) -> None:
        sequence_manager = self.model.transformer.h.sequence_manager
        sequence_manager.shutdown()
        sequence_manager.dht.shutdown()


def separate(client: Client, n: int, tokens: int) -> float:
    threads = [threading.Thread(target=client.generate, args=(1, tokens)) for _ in range(n)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def shared(client: Client, n: int, tokens: int) -> float:
    start = time.perf_counter()
    client.generate(n, tokens)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_models_argument(parser)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    print(f"{machine_description()}; load {load_average()}; n={args.n}, {args.tokens} tokens, {args.rounds} rounds")
    for name in args.models:
        bench = BENCH_MODELS[name]
        model_dir = bench.build()
        with (
            tempfile.TemporaryDirectory() as logs,
            PrivateSwarm(model_dir, list(bench.blocks), Path(logs), dht_prefix=DHT_PREFIX) as swarm,
        ):
            client = Client(model_dir, swarm.initial_peers)
            try:
                client.generate(1, 2)  # warm-up: routes found, first session's costs paid
                times: dict[str, list[float]] = {"separate": [], "shared": []}
                for round_ in range(args.rounds):
                    ways = [("separate", separate), ("shared", shared)]
                    for way, run in ways if round_ % 2 == 0 else reversed(ways):
                        times[way].append(run(client, args.n, args.tokens))
            finally:
                client.close()
        sep, sha = statistics.median(times["separate"]), statistics.median(times["shared"])
        print(f"{name}: n={args.n} separate sessions {sep:.2f} s, one session of batch {args.n} {sha:.2f} s "
              f"(shared/separate {sha / sep:.2f}); rounds: {times}")  # fmt: skip


if __name__ == "__main__":
    main()
