"""Helpers shared by the benchmarks: the models they run, their prompts, the machine's description, signal handling."""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.swarm.smollm2 import ensure_smollm2
from services.swarm.tiny_bloom import ensure_tiny_bloom

SUBJECTS = ("The old sailor", "A curious child", "The night nurse", "My neighbour's cat", "The last train")
PLACES = ("harbour", "library", "kitchen", "forest", "station", "market", "garden")


def prompt_for(index: int) -> str:
    """A different prompt for each session."""
    subject, place = SUBJECTS[index % len(SUBJECTS)], PLACES[index // len(SUBJECTS) % len(PLACES)]
    return f"Story {index}: {subject} walked into the quiet {place} and"


@dataclass(frozen=True)
class BenchModel:
    """An embedded model a benchmark can run, and how its private swarm splits it."""

    name: str
    build: Callable[[], Path]
    blocks: tuple[str, ...]  # one block range per Petals server
    description: str


BENCH_MODELS = {
    model.name: model
    for model in (
        BenchModel("tiny-bloom", ensure_tiny_bloom, ("0:2", "2:4"), "tiny BLOOM (4 blocks, hidden 64, random weights)"),
        BenchModel(
            "smollm2-135m-instruct", ensure_smollm2, ("0:15", "15:30"), "SmolLM2-135M-Instruct (30 Llama blocks, GQA)"
        ),
    )
}


def add_models_argument(parser: argparse.ArgumentParser, default: tuple[str, ...] = tuple(BENCH_MODELS)) -> None:
    """``--models``: which embedded models to measure, one after the other (each on a swarm of its own)."""
    parser.add_argument("--models", nargs="+", choices=BENCH_MODELS, default=list(default),
                        help=f"models to measure (default: {' '.join(default)})")  # fmt: skip


def _proc_field(path: str, name: str) -> str | None:
    """The value of the first ``name: value`` line of a /proc file, if any."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == name), None)


def machine_description() -> str:
    """CPU model and count, RAM, OS, Python and torch versions, on one line."""
    import torch

    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()
    mem_kib = _proc_field("/proc/meminfo", "MemTotal")
    ram = f"{int(mem_kib.split()[0]) / 2**20:.1f} GiB RAM" if mem_kib else "RAM unknown"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu}, {os.cpu_count()} CPUs ({usable} usable), {ram}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def load_average() -> str:
    """The 1/5/15-minute load averages (other processes share this machine)."""
    return "/".join(f"{load:.2f}" for load in os.getloadavg())


def exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM handler (e.g. from ``timeout``): unwind, so ``finally`` blocks stop what was started."""
    raise SystemExit(128 + signum)
