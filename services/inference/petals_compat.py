"""A fix for a deadlock in the Petals 2.2 client, installed before the model loads.

``_ServerInferenceSession.close()`` (also called from ``__del__``) runs a coroutine on the
client's single event-loop thread and blocks until it finishes. When the garbage collector
finalizes an unclosed server session *on that same thread* (it can run there at any
allocation), the loop waits for itself: every later swarm call of the process hangs, silently
and for good. Seen here after a few dozen one-off generations, with this stack in the loop
thread: ``_ServerInferenceSession.create -> wait_for -> __del__ -> close -> run_coroutine``.

The patched ``close``: on the event-loop thread, schedules the close on the loop instead of
waiting for it; on any other thread, waits at most ``CLOSE_TIMEOUT_S`` for the server to
acknowledge (the original waits forever if a server never answers).

Fenced to petals 2.2.0.post1 and hivemind 1.1.11 (``check``; docs/patches.md).
"""

from __future__ import annotations

import asyncio
import logging
import threading

from services.common.startup.patching import require_attributes, require_version

logger = logging.getLogger(__name__)
CLOSE_TIMEOUT_S = 10.0
PATCH = "petals_compat"
PATCHED_VERSIONS = {"petals": "2.2.0.post1", "hivemind": "1.1.11"}
_installed = False


def check() -> None:
    """Raise PatchError unless the installed Petals and hivemind are the ones this patch fits."""
    for dist, version in PATCHED_VERSIONS.items():
        require_version(dist, version, PATCH)
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from petals.client.inference_session import _ServerInferenceSession

    require_attributes(_ServerInferenceSession, ("close", "_aclose_stream"), PATCH)
    require_attributes(RemoteExpertWorker, ("_event_thread", "run_coroutine"), PATCH)


def install() -> None:
    """Patch ``petals.client.inference_session._ServerInferenceSession.close`` (idempotent); raises
    PatchError (``check``) where it does not fit."""
    global _installed
    if _installed:
        return
    check()
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from petals.client.inference_session import _ServerInferenceSession

    def close(self: _ServerInferenceSession) -> None:
        if self._outputs_stream is None:
            return  # already closed
        closing = self._aclose_stream()
        if threading.current_thread() is RemoteExpertWorker._event_thread:
            asyncio.get_event_loop().create_task(closing)  # never block the loop on itself
        else:
            try:
                RemoteExpertWorker.run_coroutine(asyncio.wait_for(closing, CLOSE_TIMEOUT_S))
            except Exception as error:  # the server is gone or slow: it frees the cache on its own timeout
                logger.warning("closing a Petals server session failed: %r", error)
        self._outputs_stream = self._inputs_queue = None
        self.closed = True

    _ServerInferenceSession.close = close
    _installed = True
