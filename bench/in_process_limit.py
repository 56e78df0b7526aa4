"""The in-process limit: transformers ``generate`` of the whole model in one process, N sessions as one batch.

What batching could reach at best on this machine: no swarm, no RPC, no services. The N prompts are
the benchmark's (``bench.common.prompt_for``), left-padded into one batch, decoded greedily for
exactly ``tokens`` new tokens each, float32 (the servers' dtype), torch with one intra-op thread per
usable core; one short unmeasured warm-up first. ``measure_in_process`` runs it in a child process
(``python -m bench.in_process_limit MODEL_DIR BATCH TOKENS THREADS``, one JSON line on stdout), so
its threads share nothing with the benchmark's interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import prompt_for

WARMUP_TOKENS = 2


def generate_rate(model_dir: Path, batch: int, tokens: int, threads: int) -> float:
    """Tokens/s of one greedy ``generate`` of ``batch`` left-padded prompts, ``tokens`` new tokens each."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    prompts = [prompt_for(i) for i in range(batch)]
    inputs = tokenizer(
        prompts, return_tensors="pt", padding=True, add_special_tokens=False, return_token_type_ids=False
    )

    def generate(new_tokens: int) -> None:
        model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       pad_token_id=tokenizer.pad_token_id)  # fmt: skip

    with torch.inference_mode():
        generate(WARMUP_TOKENS)
        started = time.perf_counter()
        generate(tokens)
        return batch * tokens / (time.perf_counter() - started)


def measure_in_process(model_dir: Path, batch: int, tokens: int, threads: int, timeout_s: float = 600.0) -> float:
    """``generate_rate`` in a child process of its own (the benchmark's environment, HF_HUB_OFFLINE included)."""
    command = [sys.executable, "-m", "bench.in_process_limit", str(model_dir), str(batch), str(tokens), str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the in-process limit failed ({done.returncode}): {done.stderr[-500:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"])


def main() -> None:
    """Child side: measure, print one JSON line."""
    model_dir, batch, tokens, threads = sys.argv[1:]
    rate = generate_rate(Path(model_dir), int(batch), int(tokens), int(threads))
    print(json.dumps({"tokens_per_s": rate}), flush=True)


if __name__ == "__main__":
    main()
