"""The swarm's state for one model (``ModelSwarm``): what a replica gathers from the DHT and the
gateway serves at ``GET /api/v2/swarm``, one typed shape and its JSON form for both.

A replica reads every server announcing its model's blocks (services/inference/swarm_watch.py) and
``summarise`` turns them into a bounded summary: coverage per block (online servers holding it),
the block ranges no online server holds (then there is no full route: ``broken``), the smallest
redundancy, server counts by state, the cache room (the servers' announced sum, and the session
tokens the tightest block still holds), and at most ``max_servers`` servers
listed (online first, the fastest first), so a public swarm of thousands of servers stays small.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

SWARM_PATH = "/internal/swarm"  # the replica's path the gateway asks
SERVER_STATES = ("online", "joining", "offline")  # Petals' ServerState, best first


class SwarmHealth(StrEnum):
    """A model's swarm, in one word."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"  # every block served, but by fewer servers than wanted, or caches nearly full
    BROKEN = "broken"  # some block has no online server: no full route
    UNKNOWN = "unknown"  # never refreshed


@dataclass(frozen=True)
class SwarmThresholds:
    """When a served swarm counts as degraded."""

    min_redundancy: int = 1  # fewer online servers than this on some block
    min_cache_tokens: int = 0  # less cache room than this on some block (summed over its online servers)


@dataclass(frozen=True)
class ServerEntry:
    """One server announcing blocks of the model (blocks relative to the model's first)."""

    peer_id: str
    start_block: int
    end_block: int  # exclusive
    state: str  # one of SERVER_STATES
    throughput: float | None = None
    cache_tokens_left: int | None = None
    version: str | None = None

    @property
    def online(self) -> bool:
        return self.state == "online"


@dataclass(frozen=True)
class ModelSwarm:
    """The swarm's state for one model (the JSON of ``GET /api/v2/swarm?model=``)."""

    model: str
    state: SwarmHealth
    num_blocks: int
    full_route: bool
    coverage: tuple[int, ...]  # online servers per block
    min_redundancy: int
    blocks_without_server: tuple[tuple[int, int], ...]  # [start, end) ranges
    servers_total: int
    servers_by_state: dict[str, int]
    servers: tuple[ServerEntry, ...]  # capped, online first
    servers_truncated: bool
    cache_tokens_left: int | None  # Petals' announced figure, summed over the online servers announcing it
    min_block_cache_tokens_left: int | None  # session tokens the tightest block's online servers still hold
    updated_at: str | None  # ISO 8601, UTC
    refresh_seconds: float

    def to_json(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        body["state"] = str(self.state)
        body["coverage"] = list(self.coverage)
        body["blocks_without_server"] = [list(span) for span in self.blocks_without_server]
        body["servers"] = [dataclasses.asdict(server) for server in self.servers]
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ModelSwarm:
        """Parse a replica's answer; ValueError, KeyError or TypeError if it is malformed."""
        fields = {field.name for field in dataclasses.fields(cls)}
        values = {name: body[name] for name in fields}
        values["state"] = SwarmHealth(body["state"])
        values["coverage"] = tuple(int(count) for count in body["coverage"])
        values["blocks_without_server"] = tuple((int(start), int(end)) for start, end in body["blocks_without_server"])
        values["servers"] = tuple(ServerEntry(**server) for server in body["servers"])
        values["servers_by_state"] = {state: int(body["servers_by_state"][state]) for state in SERVER_STATES}
        return cls(**values)

    @classmethod
    def unknown(cls, model: str, num_blocks: int, refresh_seconds: float) -> ModelSwarm:
        """A model whose swarm was never read (yet)."""
        return cls(
            model=model, state=SwarmHealth.UNKNOWN, num_blocks=num_blocks, full_route=False,
            coverage=(0,) * num_blocks, min_redundancy=0,
            blocks_without_server=((0, num_blocks),) if num_blocks else (), servers_total=0,
            servers_by_state=dict.fromkeys(SERVER_STATES, 0), servers=(), servers_truncated=False,
            cache_tokens_left=None, min_block_cache_tokens_left=None, updated_at=None, refresh_seconds=refresh_seconds,
        )  # fmt: skip


def summarise(
    model: str,
    num_blocks: int,
    servers: Iterable[ServerEntry],
    *,
    max_servers: int,
    refresh_seconds: float,
    thresholds: SwarmThresholds = SwarmThresholds(),
    now: datetime | None = None,
) -> ModelSwarm:
    """The bounded summary of every server announcing the model's ``num_blocks`` blocks."""
    servers = list(servers)
    online = [server for server in servers if server.online]
    coverage = _coverage(num_blocks, online)
    cache_per_block = _cache_per_block(num_blocks, online)
    gaps = uncovered_ranges(coverage)
    min_redundancy = min(coverage, default=0)
    min_cache = min(cache_per_block, default=None) if all(c is not None for c in cache_per_block) else None
    announced_cache = [server.cache_tokens_left for server in online if server.cache_tokens_left is not None]
    by_state = dict.fromkeys(SERVER_STATES, 0)
    for server in servers:
        by_state[server.state] += 1
    listed = sorted(servers, key=_listing_order)[:max_servers]
    return ModelSwarm(
        model=model,
        state=_health(gaps, min_redundancy, min_cache, thresholds),
        num_blocks=num_blocks,
        full_route=not gaps,
        coverage=tuple(coverage),
        min_redundancy=min_redundancy,
        blocks_without_server=gaps,
        servers_total=len(servers),
        servers_by_state=by_state,
        servers=tuple(listed),
        servers_truncated=len(servers) > len(listed),
        cache_tokens_left=sum(announced_cache) if announced_cache else None,
        min_block_cache_tokens_left=min_cache,
        updated_at=(now or datetime.now(UTC)).isoformat(timespec="seconds").replace("+00:00", "Z"),
        refresh_seconds=refresh_seconds,
    )


def uncovered_ranges(coverage: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """The [start, end) ranges of blocks with no server."""
    ranges: list[tuple[int, int]] = []
    for block, count in enumerate(coverage):
        if count:
            continue
        if ranges and ranges[-1][1] == block:
            ranges[-1] = (ranges[-1][0], block + 1)
        else:
            ranges.append((block, block + 1))
    return tuple(ranges)


def _coverage(num_blocks: int, online: list[ServerEntry]) -> list[int]:
    """Online servers per block, by a difference array: O(blocks + servers)."""
    steps = [0] * (num_blocks + 1)
    for server in online:
        start, end = max(0, server.start_block), min(num_blocks, server.end_block)
        if start < end:
            steps[start] += 1
            steps[end] -= 1
    coverage, running = [], 0
    for step in steps[:num_blocks]:
        running += step
        coverage.append(running)
    return coverage


def session_tokens_left(server: ServerEntry) -> int:
    """How many more tokens of sessions a server's attention cache holds: Petals announces its room
    as keys and values of one block (``cache_tokens_left``), and a session of n tokens takes
    2 n per block the server holds (as Petals' routing counts it)."""
    return (server.cache_tokens_left or 0) // (2 * max(1, server.end_block - server.start_block))


def _cache_per_block(num_blocks: int, online: list[ServerEntry]) -> list[int | None]:
    """Per block, the tokens of sessions its online servers still hold, together (None: one of them does
    not announce its room)."""
    steps: list[int] = [0] * (num_blocks + 1)
    silent = [0] * (num_blocks + 1)
    for server in online:
        start, end = max(0, server.start_block), min(num_blocks, server.end_block)
        if start >= end:
            continue
        target, amount = (silent, 1) if server.cache_tokens_left is None else (steps, session_tokens_left(server))
        target[start] += amount
        target[end] -= amount
    room: list[int | None] = []
    tokens = unknown = 0
    for block in range(num_blocks):
        tokens, unknown = tokens + steps[block], unknown + silent[block]
        room.append(None if unknown else tokens)
    return room


def _health(
    gaps: tuple[tuple[int, int], ...], min_redundancy: int, min_cache: int | None, thresholds: SwarmThresholds
) -> SwarmHealth:
    if gaps:
        return SwarmHealth.BROKEN
    if min_redundancy < thresholds.min_redundancy:
        return SwarmHealth.DEGRADED
    if min_cache is not None and min_cache < thresholds.min_cache_tokens:
        return SwarmHealth.DEGRADED
    return SwarmHealth.HEALTHY


def _listing_order(server: ServerEntry) -> tuple[int, float, str]:
    """Online first, then joining, then offline; the fastest first; then by peer id (stable)."""
    return SERVER_STATES.index(server.state), -(server.throughput or 0.0), server.peer_id
