"""The Petals client stays responsive over many sessions (regression: a GC-triggered deadlock).

Without services/inference/petals_compat.py, a few dozen one-off generations were enough for
the garbage collector to finalize a Petals server session on the client's event-loop thread,
which then waited for itself: every later request hung.
"""

from __future__ import annotations


def test_hundreds_of_petals_sessions_do_not_wedge_the_client(api):
    for index in range(120):
        body = api.generate(inputs=f"Request {index}:", max_new_tokens=1)
        assert body["ok"], body
        if index % 4 == 0:
            session_id = api.open_session(16)
            assert api.generate(inputs="Hi", max_new_tokens=1, session_id=session_id)["ok"]
            assert api.close_session(session_id) == {"ok": True}
