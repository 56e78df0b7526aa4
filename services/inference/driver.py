"""Drives one generation through the swarm, rebuilding its Petals session after a swarm failure.

When the swarm fails mid-generation beyond what Petals recovers by itself (a server that died
leaves Petals 2.2 with "Broken input cache" on failover), the driver rebuilds the Petals session
in place: a fresh session, into which every token the old one held and every token generated so
far is replayed, then generation goes on where it stopped. The client sees a pause, not an
error, and the output is what it would have been (greedy, or seeded sampling, whose generator
carries on). Up to ``MAX_REBUILDS`` per request, and only while the swarm is ready.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

from services.common.web.errors import ApiError
from services.inference.metrics import SESSION_REBUILDS
from services.inference.sessions import OneOffLease, SessionLease
from services.inference.swarm_stepper import SwarmStepper

logger = logging.getLogger(__name__)

MAX_REBUILDS = 2  # in-place session rebuilds per request before the failure is reported


class SwarmFailure(ApiError):
    """The swarm could not complete a generation step."""

    http_status = "502 Bad Gateway"
    error_code = "swarm_error"


class SwarmDriver:
    """Generates a request's tokens in a lease's Petals session, rebuilding it when the swarm fails.

    Of the stepper it uses ``generate``, ``swarm_ready`` and ``open_petals_session`` (the unit tests
    pass a fake with just those)."""

    def __init__(
        self,
        stepper: SwarmStepper,
        lease: SessionLease | OneOffLease,
        processors: Any,
        prompt_hidden: Callable[[Any], None] | None = None,
    ) -> None:
        """``prompt_hidden``: called once with the hidden states of every position of the first step."""
        self._stepper = stepper
        self._lease = lease
        self._processors = processors
        self._prompt_hidden = prompt_hidden
        self._prefix = lease.tokens.snapshot()  # held before this request
        self.generated: list[int] = []

    def tokens(self, input_ids: list[int], new_tokens: int) -> Iterator[int]:
        """Yield up to ``new_tokens`` token ids generated after ``input_ids``; raises SwarmFailure once
        no rebuild can help. Closing it stops the model at once."""
        token_ids, failure = input_ids, None
        for attempt in range(MAX_REBUILDS + 1):
            if failure is not None:
                logger.warning("swarm failure (%r): rebuilding the session, attempt %d", failure, attempt)
                self._rebuild()
                token_ids = self._prefix.ids() + input_ids + self.generated
            try:
                due = new_tokens - len(self.generated)
                with closing(self._steps(token_ids, due)) as steps:
                    for token in steps:
                        self.generated.append(token)
                        yield token
                return
            except Exception as error:
                logger.warning("generation failed in the swarm", exc_info=True)
                failure = error
            if not self._stepper.swarm_ready():
                break
        raise SwarmFailure(f"The Petals swarm failed during generation ({type(failure).__name__})") from failure

    def _steps(self, token_ids: list[int], due: int) -> Iterator[int]:
        if self._prompt_hidden is None:
            return self._stepper.generate(self._lease.petals, token_ids, due, self._processors)
        return self._stepper.generate(self._lease.petals, token_ids, due, self._processors, self._read_prompt)

    def _read_prompt(self, hidden: Any) -> None:
        if self._prompt_hidden is not None:
            self._prompt_hidden(hidden)
            self._prompt_hidden = None  # once: a rebuild replays the prompt without scoring it again

    def _rebuild(self) -> None:
        """Swap in a fresh Petals session (the next attempt replays every token) and close the broken one."""
        broken = self._lease.replace_petals(self._stepper.open_petals_session(self._lease.max_length))
        threading.Thread(target=_close_quietly, args=(broken,), name="close-broken", daemon=True).start()
        SESSION_REBUILDS.inc()


def _close_quietly(petals_session: Any) -> None:
    try:
        petals_session.close()
    except Exception:
        logger.debug("closing a broken Petals session failed", exc_info=True)
