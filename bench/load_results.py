"""What a concurrency run measures: each session's tokens, each run's results, their summary per table row.

Shared by bench/concurrency.py (the runs and their report) and bench/batching_ab.py (batching off
against on); plus the right-aligned table and the verdicts both print.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

CPU_SETS = {  # CPU time is summed over the live processes of these process groups
    "bench": "this process and the raw client's (HTTP clients, raw Petals client)",
    "svc": "inference + gateway services",
    "swarm": "the 2 Petals servers",
}
OTHERS = "others"  # every other process of the machine (other users' work, the kernel)


@dataclass
class SessionResult:
    """What one session produced, with the moments its tokens arrived."""

    start: float
    token_times: list[float] = field(default_factory=list)
    text: str = ""
    error: str | None = None
    end: float = 0.0  # the last token's arrival (or the failure)


@dataclass
class LoadResult:
    """One run of N concurrent sessions of one client."""

    sessions: list[SessionResult]
    wall_s: float
    cpu_s: dict[str, float] = field(default_factory=dict)  # process set -> CPU seconds used during the run

    @property
    def tokens(self) -> int:
        return sum(len(s.token_times) for s in self.sessions if s.error is None)

    @property
    def errors(self) -> list[str]:
        return [s.error for s in self.sessions if s.error is not None]


Runs = dict[tuple[str, int], list[LoadResult]]  # (client, N) -> one result per round


@dataclass(frozen=True)
class Summary:
    """One table row: a client at one session count, over all rounds."""

    tokens: int
    wall_s: float
    p50_ms: float
    p99_ms: float
    ttft_ms: float
    errors: int
    cpu_s: dict[str, float]

    @property
    def rate(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def cpu_ms_per_token(self, name: str) -> str:
        return f"{self.cpu_s[name] * 1000 / self.tokens:.1f}" if self.tokens else "-"

    @property
    def own_cpu_s_per_token(self) -> float:
        """CPU per token of everything the benchmark runs (this process, the services, the swarm)."""
        return sum(self.cpu_s[name] for name in CPU_SETS) / self.tokens if self.tokens else float("nan")

    @property
    def others_cores(self) -> float:
        """CPU cores other processes used on average meanwhile."""
        return self.cpu_s[OTHERS] / self.wall_s if self.wall_s else 0.0


def summarize(results: list[LoadResult]) -> Summary:
    """Totals over rounds; latency percentiles over every gap between a session's tokens."""
    sessions = [s for r in results for s in r.sessions if s.error is None and s.token_times]
    gaps = [b - a for s in sessions for a, b in zip(s.token_times, s.token_times[1:], strict=False)]
    first = [s.token_times[0] - s.start for s in sessions]
    return Summary(
        tokens=sum(r.tokens for r in results),
        wall_s=sum(r.wall_s for r in results),
        p50_ms=statistics.median(gaps) * 1000 if gaps else float("nan"),
        p99_ms=_percentile(gaps, 99) * 1000,
        ttft_ms=statistics.median(first) * 1000 if first else float("nan"),
        errors=sum(len(r.errors) for r in results),
        cpu_s={name: sum(r.cpu_s.get(name, 0.0) for r in results) for name in (*CPU_SETS, OTHERS)},
    )


def _percentile(samples: list[float], percent: int) -> float:
    if len(samples) < 2:
        return samples[0] if samples else float("nan")
    return statistics.quantiles(samples, n=100, method="inclusive")[percent - 1]


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Right-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(*(cell.rjust(width) for cell, width in zip(row, widths, strict=True)), sep="  ")


def verdict(met: bool) -> str:
    """A target's verdict, as printed."""
    return "MET" if met else "NOT MET"
