"""Server-Sent Events framing (the streaming endpoints)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"  # SSE is UTF-8; say so for clients that guess
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(event: str, data: dict[str, Any]) -> bytes:
    """One SSE message: ``event: NAME`` and a one-line JSON ``data`` field."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def sse_error(code: str, message: str) -> bytes:
    """The error event that ends a stream that had already started."""
    return sse_event("error", {"ok": False, "error": {"code": code, "message": message}})


def parse_sse(chunks: Iterable[bytes]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, JSON data) for each message of a stream of SSE bytes, as they arrive."""
    parser = SseParser()
    for chunk in chunks:
        yield from parser.feed(chunk)


async def parse_sse_async(chunks: AsyncIterable[bytes]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """``parse_sse`` over an asynchronous stream of bytes."""
    parser = SseParser()
    async for chunk in chunks:
        for message in parser.feed(chunk):
            yield message


class SseParser:
    """Splits SSE bytes into (event name, JSON data) messages, whatever the chunking."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[tuple[str, dict[str, Any]]]:
        self._buffer += chunk
        messages = []
        while b"\n\n" in self._buffer:
            message, self._buffer = self._buffer.split(b"\n\n", 1)
            event, data = "message", []
            for line in message.decode("utf-8").split("\n"):
                if line.startswith("event:"):
                    event = line[len("event:") :].strip()
                elif line.startswith("data:"):
                    data.append(line[len("data:") :].strip())
            if data:
                messages.append((event, json.loads("\n".join(data))))
        return messages
