"""Continuous batching off against on (the servers' SWARM_BATCHING), from two whole runs of bench/concurrency.py.

Per client and number of sessions N: tokens/s off and on and their ratio, the "on" run's ratio to
the stock baseline (the raw Petals client against servers with batching off: stock client, stock
servers) and to the in-process limit (bench/in_process_limit.py: transformers ``generate`` at batch
N in one process), p50/p99 time per token, the swarm's CPU per token, and whether every greedy
output of the "on" run equals the "off" run's for the same client, N and prompt. Verdicts against
BATCHING_TARGETS are printed, never asserted.
"""

from __future__ import annotations

from collections.abc import Mapping

from bench.load_results import LoadResult, Runs, Summary, print_table, summarize, verdict

OFF, ON = "off", "on"
STOCK_CLIENT = "raw"  # the bare Petals client; with batching off, the stock baseline
TARGET_CLIENT = "gateway stream"
RATE_TARGETS = {16: 80.0, 32: 100.0}  # sessions: tokens/s the target client must reach with batching on
IN_PROCESS_RATIO = 0.8  # at least this share of the in-process limit at the same N (RATE_TARGETS' Ns)
ALONE_LIMIT = 1.05  # one session: time per token with batching on / off at most
BATCHING_TARGETS = (
    "batching on, through the gateway: at least 80 tokens/s at 16 sessions and 100 at 32, zero errors, "
    "every greedy output equal to the batching-off run's",
    f"batching on, through the gateway: at least {IN_PROCESS_RATIO}x the in-process limit at 16 and 32 sessions",
    f"1 session: time per token with batching on at most {ALONE_LIMIT}x off's, every client",
)
HEADER = ("N", "client", "tok/s off", "tok/s on", "on/off", "on/stock", "in-process", "on/in-proc", "p50 off",
          "p50 on", "p99 off", "p99 on", "swarm CPU off", "swarm CPU on", "errors on", "outputs = off")  # fmt: skip
LEGEND = """\
tok/s: tokens/s; on/stock: the client with batching on / the raw client with batching off (stock client and
  servers); in-process: transformers generate at batch N in one process; p50/p99: time per token in ms;
  swarm CPU: ms of the Petals servers' CPU per token; outputs = off: sessions whose greedy text with batching
  on equals the batching-off run's (same client, N, prompt) / sessions compared"""


def texts_by_prompt(results: list[LoadResult]) -> dict[int, str]:
    """Each prompt index's text (the first round's that has one), errors left out."""
    texts: dict[int, str] = {}
    for result in results:
        for index, session in enumerate(result.sessions):
            if session.error is None:
                texts.setdefault(index, session.text)
    return texts


def same_outputs(off: list[LoadResult], on: list[LoadResult]) -> tuple[int, int]:
    """(sessions of ``on`` whose text equals ``off``'s for the same prompt, sessions compared)."""
    reference = texts_by_prompt(off)
    compared = [
        (reference[i], s.text) for r in on for i, s in enumerate(r.sessions) if s.error is None and i in reference
    ]
    return sum(a == b for a, b in compared), len(compared)


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}" if numerator and denominator else "-"


def _figure(summary: Summary | None, value: str) -> str:
    if summary is None:
        return "-"
    return summary.cpu_ms_per_token("swarm") if value == "swarm" else f"{getattr(summary, value):.1f}"


def ab_row(count: int, client: str, runs: Mapping[str, Runs], in_process: float | None) -> tuple[str, ...]:
    """One table row; a batching value that was not run reads "-"."""
    off, on = (summarize(runs[v][client, count]) if v in runs else None for v in (OFF, ON))
    stock = summarize(runs[OFF][STOCK_CLIENT, count]) if OFF in runs else None
    same = "-"
    if off and on:
        equal, compared = same_outputs(runs[OFF][client, count], runs[ON][client, count])
        same = f"{equal}/{compared}"
    rate = lambda s: s.rate if s else None  # noqa: E731
    return (str(count), client, _figure(off, "rate"), _figure(on, "rate"), _ratio(rate(on), rate(off)),
            _ratio(rate(on), rate(stock)), f"{in_process:.1f}" if in_process else "-", _ratio(rate(on), in_process),
            *(_figure(s, value) for value in ("p50_ms", "p99_ms", "swarm") for s in (off, on)),
            str(on.errors) if on else "-", same)  # fmt: skip


def throughput_verdicts(runs: Mapping[str, Runs], count: int, in_process: float | None) -> list[str]:
    """The gateway's tokens/s, errors and outputs with batching on at ``count`` sessions; its share of the
    in-process limit."""
    on = summarize(runs[ON][TARGET_CLIENT, count])
    target = RATE_TARGETS[count]
    equal, compared = same_outputs(runs[OFF][TARGET_CLIENT, count], runs[ON][TARGET_CLIENT, count])
    met = on.rate >= target and on.errors == 0 and equal == compared
    lines = [f"  N={count} {TARGET_CLIENT}, on: {on.rate:.1f} tokens/s (target {target:.0f}), {on.errors} errors, "
             f"outputs equal to off's {equal}/{compared}: {verdict(met)}"]  # fmt: skip
    if in_process:
        share = on.rate / in_process
        lines.append(f"  N={count} {TARGET_CLIENT}, on: {share:.2f}x the in-process limit ({in_process:.1f} tokens/s; "
                     f"target {IN_PROCESS_RATIO}x): {verdict(share >= IN_PROCESS_RATIO)}")  # fmt: skip
    return lines


def aloneverdict(runs: Mapping[str, Runs], client: str) -> str:
    """One session's time per token with batching on against off."""
    off_rate, on_rate = (summarize(runs[value][client, 1]).rate for value in (OFF, ON))
    per_token = off_rate / on_rate if on_rate else float("inf")
    met = per_token <= ALONE_LIMIT
    return f"  N=1 {client}: time per token on/off {per_token:.3f}x (limit {ALONE_LIMIT}x): {verdict(met)}"


def verdicts(
    runs: Mapping[str, Runs], counts: list[int], clients: list[str], in_process: Mapping[int, float]
) -> list[str]:
    """One line per BATCHING_TARGETS check; none unless both batching values ran."""
    if set(runs) != {OFF, ON}:
        return ["  batching off and on were not both run: no verdicts"]
    lines = [aloneverdict(runs, client) for client in clients] if 1 in counts else []
    for count in counts:
        if count in RATE_TARGETS and TARGET_CLIENT in clients:
            lines += throughput_verdicts(runs, count, in_process.get(count))
    return lines


def report_batching(
    runs: Mapping[str, Runs], counts: list[int], clients: list[str], in_process: Mapping[int, float]
) -> None:
    """The A/B table, its legend and the verdicts against BATCHING_TARGETS."""
    print("\nbatching off vs on (SWARM_BATCHING on every server; raw with batching off = stock Petals baseline):")
    print_table([HEADER, *(ab_row(n, client, runs, in_process.get(n)) for n in counts for client in clients)])
    print(LEGEND)
    print("\nbatching targets:", *BATCHING_TARGETS, sep="\n  ")
    print(*verdicts(runs, counts, clients, in_process), sep="\n")
