"""The inference worker's patches of Petals, installed (and checked) in one place at start-up.

``install()`` runs in the app factory, before the model loads in the background: a patch that
does not fit the installed library raises PatchError there, and the worker fails to boot with
that line (gunicorn then stops), instead of the loading loop retrying it for ever.
lm_head's forward replaces a loaded model's head, so it is installed with the model; its fit is
checked here. See docs/patches.md.
"""

from __future__ import annotations

from services.inference import grouped_sessions, lm_head, petals_compat, step_packing
from services.inference.metrics import STEP_BATCH_SESSIONS


def install(step_batching: bool = False, step_batch_sessions: int = grouped_sessions.MAX_SESSIONS) -> None:
    """Patch the Petals client (deadlock fix, step packing, with ``step_batching`` its grouped sessions, at
    most ``step_batch_sessions`` per request) and check the LM head's fit; raises PatchError."""
    petals_compat.install()
    step_packing.install()
    if step_batching:  # after petals_compat: it patches the class replaced
        grouped_sessions.install(STEP_BATCH_SESSIONS.observe, step_batch_sessions)
    lm_head.check()
