"""The replica's LM head under concurrent sessions, batched (REPLICA_HEAD_BATCHING) or each token alone.

``--sessions`` threads each compute ``--tokens`` one-token head products through the service's head
(services/inference/lm_head.py, as the replica installs it: the row split over ``--threads`` for a
float32 head), each thread pausing ``--step-ms`` between its products as a session waits for the
swarm. The head is SmolLM2-135M's shape (49,152 x 576, float32, random weights). Prints, per mode:
products per second, the process's CPU time per token and the batch sizes seen. Figures only, never
asserted. Run: ``.venv/bin/python -m bench.head_batching [--sessions 16] [--tokens 64] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import collections
import threading
import time

import torch

from services.inference import lm_head

VOCABULARY, HIDDEN = 49_152, 576


class Head(torch.nn.Module):
    """The shape of Petals' LMHead: a weight and a forward."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.use_chunked_forward = False

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden_states, self.weight)


def run(batching: bool, args: argparse.Namespace) -> None:
    """One mode's run, printed."""
    sizes: collections.Counter[int] = collections.Counter()
    head = Head(torch.randn(VOCABULARY, HIDDEN))
    installed = lm_head.install(head, args.threads, (lambda size: sizes.update([size])) if batching else None)

    def session(seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            for _ in range(args.tokens):
                head.forward(torch.randn(1, HIDDEN, generator=generator))
                time.sleep(args.step_ms / 1000)

    threads = [threading.Thread(target=session, args=(seed,)) for seed in range(args.sessions)]
    wall, cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = args.sessions * args.tokens
    batches = ", ".join(f"{size}: {count}" for size, count in sorted(sizes.items())) or "none (each token alone)"
    print(f"batching {'on ' if batching else 'off'}: {tokens / wall:7.1f} tokens/s, {1000 * cpu / tokens:6.2f} ms "
          f"CPU per token; products by size: {batches}")  # fmt: skip
    if installed is not None:
        installed.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="the head's row-split threads (TORCH_THREADS)")
    parser.add_argument("--step-ms", type=float, default=50.0, help="each session's pause between products")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.sessions} sessions x {args.tokens} tokens, head {VOCABULARY} x {HIDDEN} float32, "
          f"{args.threads} threads, {args.step_ms:.0f} ms between a session's products")  # fmt: skip
    for batching in (False, True, False, True):
        run(batching, args)


if __name__ == "__main__":
    main()
