"""Which sessions a grouped channel's next request waits for, so that sessions stepping together stay together.

The replica's sessions reach a server span one after another: when the span before answers them
(a few threads waking in turn), or when the replica has taken their tokens (its head, sampling, the
stream to the client: tens of milliseconds for 16 sessions). A channel that sent the first comer
alone would split them into cohorts, each costing the server a whole pass over its blocks (a pass
of 1 session costs about as much as one of 8). So when a span answers sessions, their next span
*expects* them, and its next request waits until every expected session has stepped, or:

- it closed, or its generation ended (``forget``);
- its time is up: ``limit_s`` after the answer. The session is then *slow*: it is no longer waited
  for until it once comes back within the limit (a client reading slowly does not hold up the others
  at every token, only once);
- a session nobody expects (a new one, a slow one) never waits.

One session alone never waits: it only ever expects itself. Pure: times are passed in.
"""

from __future__ import annotations

GATHER_LIMIT_S = 0.25  # at most this long after an answer is a session's next step waited for


class StepGathering:
    """The sessions one channel expects; its times are the caller's clock's seconds."""

    def __init__(self, limit_s: float = GATHER_LIMIT_S) -> None:
        self._limit_s = limit_s
        self._answered_at: dict[int, float] = {}  # session -> when the span before answered it, until it steps
        self._slow: set[int] = set()  # sessions not waited for

    def expect(self, key: int, now: float) -> None:
        """Session ``key`` was just answered by the span before this one (or by this route's last span)."""
        self._answered_at[key] = now

    def arrived(self, key: int, now: float) -> None:
        """Session ``key`` sent its step: it is slow if it came later than the limit, else no longer."""
        answered_at = self._answered_at.pop(key, None)
        if answered_at is not None:
            (self._slow.add if now - answered_at > self._limit_s else self._slow.discard)(key)

    def forget(self, key: int) -> None:
        """Session ``key`` will not step soon (its generation ended) or ever (closed)."""
        self._answered_at.pop(key, None)
        self._slow.discard(key)

    def wait_until(self, now: float) -> float | None:
        """Until when the next request should wait for the sessions expected, or None to send it now.
        Those whose time is up become slow."""
        until = None
        for key, answered_at in self._answered_at.items():
            if key in self._slow:
                continue
            if now - answered_at >= self._limit_s:
                self._slow.add(key)
            else:
                until = max(until or 0.0, answered_at + self._limit_s)
        return until
