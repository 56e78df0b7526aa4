"""The client's LM head on CPU against the bound this machine's memory bandwidth sets.

A client step of a large model is one matrix-vector product with the LM head (vocabulary x
hidden): the whole weight is read once per token, so the step cannot beat ``weight bytes /
memory bandwidth``. One run measures, side by side: the read bandwidth (a multi-threaded sum
over the weight itself, the best of several passes), then one token through Petals' ``LMHead`` in
bfloat16 and in float32 with the service's default thread count (float32 also with one thread), and through
the inference service's one-token heads (services/inference/lm_head.py: ``torch.mv`` in bfloat16,
the row split in float32). The target is judged on the head the service runs by default on this CPU (its
``default_dtype``: bfloat16 where the CPU has AMX, else float32).
Default shape: BLOOM-176B's head (250,880 x 14,336: 14.4 GB in float32), which needs about 15 GB
of free memory; ``--vocab``/``--hidden`` make it smaller.
Figures are printed, never asserted, against the target "within 1.2x of the bound".
Run: ``.venv/bin/python -m bench.lm_head`` (``make bench`` runs it after the latency benchmark).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import PretrainedConfig

from bench.common import load_average, machine_description
from services.common.processes.cpus import available_cpus
from services.inference import lm_head as service_lm_head
from services.inference.settings import default_dtype

TARGET_RATIO = 1.2


def best_and_median(step: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(fastest, median) seconds of ``repeats`` calls after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def petals_lm_head(weight: torch.Tensor):
    """Petals' LMHead (as the client builds it) holding ``weight``."""
    from petals.client.lm_head import LMHead

    vocab, hidden = weight.shape
    config = PretrainedConfig(tie_word_embeddings=True, vocab_size=vocab, hidden_size=hidden)
    config.use_chunked_forward, config.chunked_forward_step = "auto", 16384
    head = LMHead(config)
    head.weight = torch.nn.Parameter(weight, requires_grad=False)
    return head


def filled(vocab: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """A weight with every page written (untouched zero pages would read faster than memory)."""
    return torch.empty(vocab, hidden, dtype=dtype).uniform_(-0.02, 0.02)


def step_timer(head, hidden: int, threads: int) -> Callable[[], object]:
    """One token through the head with ``threads`` intra-op threads."""
    state = torch.randn(1, 1, hidden)

    def step() -> object:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return head(state)

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=250_880)
    parser.add_argument("--hidden", type=int, default=14_336)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    threads = available_cpus()
    rows: list[tuple[str, str, int, float, float, float]] = []  # (head, dtype, threads, best, median, bytes)

    weight = filled(args.vocab, args.hidden, torch.bfloat16)
    head = petals_lm_head(weight)
    rows.append(("petals", "bfloat16", threads, *best_and_median(step_timer(head, args.hidden, threads),
                 args.repeats), weight.numel() * 2))  # fmt: skip
    if service_lm_head.install(head, threads):
        timing = best_and_median(step_timer(head, args.hidden, threads), args.repeats)
        rows.append(("service", "bfloat16", threads, *timing, weight.numel() * 2))
    del head, weight

    weight = filled(args.vocab, args.hidden, torch.float32)
    nbytes = weight.numel() * 4
    torch.set_num_threads(threads)
    read_s, _ = best_and_median(lambda: weight.sum(), args.repeats)
    bandwidth = nbytes / read_s
    head = petals_lm_head(weight)
    for count in sorted({threads, 1}, reverse=True):
        timing = best_and_median(step_timer(head, args.hidden, count), args.repeats)
        rows.append(("petals", "float32", count, *timing, nbytes))
    if service_lm_head.install(head, threads):
        timing = best_and_median(step_timer(head, args.hidden, threads), args.repeats)
        rows.append(("service", "float32", threads, *timing, nbytes))

    print(f"machine: {machine_description()}; load average {load_average()}")
    print(f"LM head {args.vocab:,} x {args.hidden:,}; service defaults: TORCH_THREADS={threads}, "
          f"TORCH_DTYPE={default_dtype('cpu')}")  # fmt: skip
    print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s (best {args.repeats}-pass sum, {threads} threads)")
    print(f"{'head':>8} {'dtype':>9} {'threads':>7} {'bound s':>8} {'best s':>7} {'median s':>8} {'GB/s':>6} "
          f"{'x bound':>7}")  # fmt: skip
    for name, dtype, count, best, median, size in rows:
        bound = size / bandwidth
        print(f"{name:>8} {dtype:>9} {count:>7} {bound:8.3f} {best:7.3f} {median:8.3f} {size / median / 1e9:6.1f} "
              f"{median / bound:7.2f}")  # fmt: skip
    service = service_row(rows, default_dtype("cpu"), threads)
    ratio = service[4] / (service[5] / bandwidth)
    verdict = "MET" if ratio <= TARGET_RATIO else "NOT MET"
    print(f"target: the head the service runs on this CPU ({service[0]}, {service[1]}, {service[2]} threads) "
          f"within {TARGET_RATIO}x of the bound: {ratio:.2f}x, {verdict}")  # fmt: skip


def service_row(rows: list[tuple[str, str, int, float, float, float]], dtype: str, threads: int) -> tuple:
    """The measured head the inference service runs by default here: its dtype for this CPU, the
    row split where it installs one (float32), else Petals' head, on its thread count."""
    candidates = [row for row in rows if row[1] == dtype and row[2] == threads]
    return next((row for row in candidates if row[0] == "service"), candidates[0])


if __name__ == "__main__":
    main()
