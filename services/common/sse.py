"""Server-Sent Events framing (the streaming endpoints)."""

from __future__ import annotations

import json
from typing import Any

SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"  # SSE is UTF-8; say so for clients that guess
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(event: str, data: dict[str, Any]) -> bytes:
    """One SSE message: ``event: NAME`` and a one-line JSON ``data`` field."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def sse_error(code: str, message: str) -> bytes:
    """The error event that ends a stream that had already started."""
    return sse_event("error", {"ok": False, "error": {"code": code, "message": message}})
