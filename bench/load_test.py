"""Load test of a running gateway (or inference service): N concurrent sessions through the v1 API.

Each session opens ``/api/v1/open_inference_session``, generates greedily from its own prompt
(``/api/v1/generate``, do_sample=0) and closes. Mode ``per-token`` (the default, the seed chat
client's way) sends the prompt with max_new_tokens=1, then one request per further token in the
session; mode ``one-call`` asks for all the tokens in one request. All sessions are opened first,
then generate together. ``--model`` names the model every request asks for (the gateway's
``GET /v1/models`` lists them; default: none named, so the gateway's default model). Reported:
errors, per-token latency p50/p99 (per-token mode: each request after the prompt's; one-call mode:
each call's time / its tokens), total tokens/s and wall time.
Callers (the tests) may pass ``expected(prompt, tokens) -> text`` to check every output.

Run: ``python -m bench.load_test --gateway http://127.0.0.1:5000 [--sessions 32] [--tokens 32]
[--mode per-token|one-call] [--model NAME] [--max-length 96] [--timeout 300]``
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from client.api import Api, CallFailed

MODES = ("per-token", "one-call")
Expected = Callable[[str, int], str]


@dataclass
class SessionRun:
    """What one session did."""

    prompt: str
    session_id: str = ""
    text: str = ""
    tokens: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds per token
    error: str | None = None


@dataclass
class LoadReport:
    """The outcome of a load run."""

    mode: str
    tokens: int  # asked of each session
    model: str | None  # the model every request named (None: the gateway's default)
    runs: list[SessionRun]
    wall_s: float  # from the common start (every session open) to the last session's end
    open_s: float  # opening every session
    mismatches: list[str] = field(default_factory=list)  # prompts whose text differs from the expected

    @property
    def errors(self) -> list[str]:
        return [f"{run.prompt!r}: {run.error}" for run in self.runs if run.error]

    @property
    def latencies(self) -> list[float]:
        return [latency for run in self.runs for latency in run.latencies]

    def percentile_ms(self, q: float) -> float:
        """The q-th percentile (0-100) of per-token latency, in ms (nan without samples)."""
        samples = sorted(self.latencies)
        if not samples:
            return float("nan")
        return 1000 * samples[min(len(samples) - 1, round(q / 100 * (len(samples) - 1)))]

    @property
    def tokens_per_s(self) -> float:
        return sum(run.tokens for run in self.runs) / self.wall_s if self.wall_s else 0.0

    def replicas(self) -> dict[str, int]:
        """Sessions per replica (a session id starts with its replica's id)."""
        counts: dict[str, int] = {}
        for run in self.runs:
            if run.session_id:
                name = run.session_id.rpartition(".")[0]
                counts[name] = counts.get(name, 0) + 1
        return counts

    def summary(self) -> str:
        lines = [
            f"{len(self.runs)} sessions x {self.tokens} tokens ({self.mode}, model {self.model or 'default'}): "
            f"{len(self.errors)} errors, {len(self.mismatches)} mismatches",
            f"per-token latency p50 {self.percentile_ms(50):.1f} ms, p99 {self.percentile_ms(99):.1f} ms "
            f"(n={len(self.latencies)}, mean {1000 * statistics.fmean(self.latencies or [0]):.1f} ms)",
            f"{self.tokens_per_s:.1f} tokens/s in total, wall {self.wall_s:.2f} s (opening the sessions: "
            f"{self.open_s:.2f} s), sessions per replica {self.replicas()}",
        ]
        return "\n".join(lines + [f"error: {error}" for error in self.errors[:5]])


def prompts(count: int) -> list[str]:
    """A different prompt per session."""
    return [f"Session {index}: a story about the number {index * 7919 % 1000}." for index in range(count)]


class Session:
    """One session's whole life in one thread: open, wait for the start, generate, close."""

    def __init__(
        self, base_url: str, run: SessionRun, *, tokens: int, mode: str, max_length: int, timeout_s: float,
        model: str | None,
    ) -> None:  # fmt: skip
        self.run = run
        self.tokens = tokens
        self.mode = mode
        self.max_length = max_length
        self.model_field = {"model": model} if model else {}
        self.client = Api(base_url, timeout_s=min(120.0, timeout_s))

    def __call__(self, start: threading.Barrier, deadline: float) -> None:
        try:
            try:
                self._open()
            finally:  # the others start even if this one could not open
                start.wait(timeout=max(0.0, deadline - time.monotonic()))
            self._generate(deadline)
        except (CallFailed, threading.BrokenBarrierError, TimeoutError) as error:
            self.run.error = self.run.error or f"{type(error).__name__}: {error}"
        finally:
            self._close()

    def _open(self) -> None:
        fields = {"max_length": self.max_length, **self.model_field}
        opened = self.client.call("GET", "open_inference_session", fields)
        self.run.session_id = opened["session_id"]

    def _generate(self, deadline: float) -> None:
        if self.mode == "one-call":
            self._step(deadline, inputs=self.run.prompt, max_new_tokens=self.tokens)
            return
        self._step(deadline, inputs=self.run.prompt, max_new_tokens=1)
        self.run.latencies.clear()  # the prompt's request is no per-token latency
        for _ in range(self.tokens - 1):
            self._step(deadline, max_new_tokens=1)

    def _step(self, deadline: float, **fields: Any) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the load test's time limit was reached after {self.run.tokens} tokens")
        started = time.perf_counter()
        body = {"do_sample": 0, "session_id": self.run.session_id, **self.model_field, **fields}
        answer = self.client.call("POST", "generate", body)
        elapsed = time.perf_counter() - started
        self.run.text += answer["outputs"]
        self.run.tokens += fields["max_new_tokens"]
        self.run.latencies.extend([elapsed / fields["max_new_tokens"]] * fields["max_new_tokens"])

    def _close(self) -> None:
        if self.run.session_id:
            try:
                self.client.call("GET", "close_inference_session", {"session_id": self.run.session_id})
            except CallFailed as error:
                self.run.error = self.run.error or f"close: {error}"
        self.client.close()


def run_load(
    base_url: str,
    *,
    sessions: int = 32,
    tokens: int = 32,
    mode: str = "per-token",
    max_length: int = 96,
    timeout_s: float = 300.0,
    model: str | None = None,
    expected: Expected | None = None,
) -> LoadReport:
    """Run ``sessions`` concurrent sessions of ``tokens`` tokens each (of ``model``, default the
    gateway's); bounded by ``timeout_s``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    runs = [SessionRun(prompt) for prompt in prompts(sessions)]
    deadline = time.monotonic() + timeout_s
    start = threading.Barrier(sessions + 1)
    threads = [
        threading.Thread(target=Session(base_url, run, tokens=tokens, mode=mode, max_length=max_length,
                                        timeout_s=timeout_s, model=model),
                         args=(start, deadline), name=f"load-session-{index}", daemon=True)
        for index, run in enumerate(runs)
    ]  # fmt: skip
    opening = time.perf_counter()
    for thread in threads:
        thread.start()
    try:
        start.wait(timeout=max(0.0, deadline - time.monotonic()))  # every session is open
    except threading.BrokenBarrierError:
        start.abort()
    started = time.perf_counter()
    for thread in threads:
        thread.join(max(0.0, deadline + 5 - time.monotonic()))
    report = LoadReport(mode, tokens, model, runs, time.perf_counter() - started, started - opening)
    for run, thread in zip(runs, threads, strict=True):
        if thread.is_alive():
            run.error = run.error or "still running at the time limit"
        elif expected is not None and not run.error and run.text != expected(run.prompt, tokens):
            report.mismatches.append(run.prompt)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateway", required=True, help="base URL, e.g. http://127.0.0.1:5000")
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--mode", choices=MODES, default="per-token")
    parser.add_argument("--model", help="the model to ask for (GET /v1/models lists them; default: the gateway's)")
    parser.add_argument("--max-length", type=int, default=96, help="tokens each session holds (prompt + tokens)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole run")
    args = parser.parse_args(argv)
    report = run_load(
        args.gateway,
        sessions=args.sessions,
        tokens=args.tokens,
        mode=args.mode,
        max_length=args.max_length,
        timeout_s=args.timeout,
        model=args.model,
    )
    print(report.summary())
    return 1 if report.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
