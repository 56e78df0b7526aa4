"""The gateway worker's memory under slow WebSocket senders: figures printed, never asserted.

Starts one gateway (one Uvicorn worker, so its RSS is the figure; its replica is not there: nothing here
reaches one) on loopback and opens ``--connections`` WebSockets, each from its own loopback address
(127.0.x.y: a client of its own, the worst case for the per-client limit) or all from 127.0.0.1
(``--one-client``). Each sends the header of one text frame announcing ``--announce`` bytes, then trickles
the payload (``--chunk`` bytes every ``--interval`` s) up to one byte short of it, and holds: a message that
never completes. The worker's RSS is printed before, during (once every sender has sent all it will, and
the peak) and after (every connection closed), with how many connections the gateway refused.

Run: ``.venv/bin/python -m bench.websocket_memory [--connections 200] [--announce 409000] [--one-client]``.
Bounded: at most 1,000 connections and ``--duration`` seconds; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import struct
import tempfile
import time
from pathlib import Path

from client.probes import process_tree, rss_bytes
from deploy.local_stack import ServiceProcess, gateway_process, pick_free_port

MAX_CONNECTIONS = 1000
MIB = 2**20


def source_address(index: int, one_client: bool) -> str:
    """127.0.0.1 for every sender, or 127.0.x.y (from 127.0.1.1): one loopback address each."""
    return "127.0.0.1" if one_client else f"127.0.{1 + index // 250}.{1 + index % 250}"


async def handshake(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /api/v2/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())  # fmt: skip
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head.split(b"\r\n")[0].decode())
    return reader, writer


async def slow_sender(port: int, source: str, args: argparse.Namespace, held: list[asyncio.StreamWriter]) -> str:
    """One connection trickling a message it never finishes, left open; "held", or how the gateway refused it."""
    try:
        reader, writer = await handshake(port, source)
    except (ConnectionError, asyncio.IncompleteReadError) as error:
        return f"refused at the handshake ({error})"
    held.append(writer)
    closed = asyncio.ensure_future(reader.read(64))  # the gateway's close frame (or error message), if any
    try:
        writer.write(struct.pack("!BBQ", 0x81, 0x80 | 127, args.announce) + os.urandom(4))  # FIN, text, masked
        left = args.announce - 1
        while left > 0 and not closed.done():
            chunk = min(args.chunk, left)
            writer.write(b"x" * chunk)
            await writer.drain()
            left -= chunk
            await asyncio.sleep(args.interval)
        await asyncio.sleep(0.5)
    except ConnectionError:
        pass
    return "held" if not closed.done() else f"refused ({describe(closed.result())})"


def describe(data: bytes) -> str:
    if data[:1] == b"\x88" and len(data) >= 4:
        return f"close {struct.unpack('!H', data[2:4])[0]}"
    if data[:1] == b"\x81":
        return "error message, then close"
    return "connection closed"


class RssWatch:
    """The gateway worker's RSS, sampled every 0.1 s: the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_bytes(pid)

    async def run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes(self.pid))
            await asyncio.sleep(0.1)


async def run(port: int, worker: int, args: argparse.Namespace) -> None:
    before = rss_bytes(worker)
    watch = RssWatch(worker)
    watching = asyncio.ensure_future(watch.run())
    started = time.monotonic()
    held: list[asyncio.StreamWriter] = []
    senders = [slow_sender(port, source_address(i, args.one_client), args, held) for i in range(args.connections)]
    outcomes = await asyncio.wait_for(asyncio.gather(*senders, return_exceptions=True), timeout=args.duration)
    during = rss_bytes(worker)
    took = time.monotonic() - started
    for writer in held:
        writer.close()
    await asyncio.sleep(2)
    after = rss_bytes(worker)
    watching.cancel()
    counts: dict[str, int] = {}
    for outcome in outcomes:
        key = outcome if isinstance(outcome, str) else f"failed ({type(outcome).__name__})"
        counts[key] = counts.get(key, 0) + 1
    clients = "one client (127.0.0.1)" if args.one_client else "one client each (127.0.x.y)"
    print(f"{args.connections} connections, {clients}, each announcing {args.announce:,} bytes and sending all "
          f"but one ({args.chunk:,} bytes every {args.interval:g} s): {took:.1f} s")  # fmt: skip
    print(f"  outcomes: {counts}")
    print(f"  gateway worker RSS: before {before / MIB:.1f} MiB, during {during / MIB:.1f} MiB "
          f"(peak {watch.peak / MIB:.1f} MiB), after {after / MIB:.1f} MiB")  # fmt: skip


def start_gateway(log_dir: Path, env: dict[str, str]) -> ServiceProcess:
    gateway = gateway_process(replicas={"inference-0": "http://127.0.0.1:9"}, port=pick_free_port(),
                              log_path=log_dir / "gateway.log", extra_env={"GUNICORN_WORKERS": "1", **env})  # fmt: skip
    return gateway.start_ready(timeout=60, path="/healthz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--announce", type=int, default=409_000, help="bytes each message's frame announces")
    parser.add_argument("--chunk", type=int, default=16_384)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--one-client", action="store_true", help="every connection from 127.0.0.1")
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the gateway, repeatable")
    args = parser.parse_args()
    args.connections = min(args.connections, MAX_CONNECTIONS)
    env = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory(prefix="bench-ws-memory-") as log_dir:
        gateway = start_gateway(Path(log_dir), env)
        try:
            assert gateway.process is not None
            worker = process_tree(gateway.process.pid)[-1]
            asyncio.run(run(gateway.port, worker, args))
        finally:
            gateway.stop()


if __name__ == "__main__":
    main()
