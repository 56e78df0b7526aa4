"""gunicorn's threaded worker, hardened against idle and stalled clients.

The stock ``gthread`` worker hands every new connection to a pool thread, which waits up to 5 s
for a first byte and then blocks, with no time limit, until the request head is complete. A few
hundred connections that send nothing, or half a request line, tie up every thread: measured
on the gateway (2 workers x 32 threads), 200 connections that each sent a request line and
stopped froze it for as long as they stayed open. Here a new connection waits in the worker's
poller until it sends data (an idle one costs no thread and is closed after ``keepalive``
seconds, like an idle kept-alive one, or within seconds when the worker stops), and a request
head must then arrive within ``HEAD_TIMEOUT_S``, or the connection's read side is shut down and
gunicorn drops it.

A kept-alive connection whose next request follows within ``NEXT_REQUEST_WAIT_S`` (a client that
calls again as soon as it has its answer, like a v1 session asking token after token) is served
on by the thread that answered it, while at least half the threads are free: gunicorn would hand
it back to the worker's poller and then to another thread. Measured with 16 such clients on one
worker (a Falcon JSON answer), the worker's CPU per request fell from 0.44-0.50 ms to 0.34-0.35
ms: thread wake-ups and poller changes. A connection that stays quiet goes to the poller as before.

A response of known length (a ``Content-Length``: every JSON answer) leaves in one TCP segment,
head and body together: gunicorn writes them with two sends, and the connection is corked
(``TCP_CORK``) from the app's ``start_response`` until the request is done: a client waiting for
its answer wakes once for it, where two segments could wake it twice. Streams (no length) are
never corked: each event leaves as it is written. Measured side by side (two replicas on one swarm,
16 sessions of 32 one-token v1 requests, 6 alternating rounds, twice): 131.1 against 124.4 and
148.8 against 145.0 tokens/s.

A client that trickles a request body still holds its thread while it does (gunicorn has no
body deadline); a buffering proxy in front (the Ingress) is the defence against that.

On SIGTERM the worker first runs the tasks registered with ``before_stopping`` while it still
accepts and serves requests (gunicorn stops listening at once), then stops as gunicorn does; the
master's ``graceful_timeout`` bounds both together.

A request gunicorn refuses by itself (a malformed request line or header, a head over the limits)
is answered in the API's JSON error shape (services/common/web/protocol_errors.py) instead of
gunicorn's HTML page: gunicorn still picks the status and the message, and logs it.

The worker overrides and reads gunicorn's internals: fenced to gunicorn 27.0.1 (``check``, run by
the master as it reads its config: services/common/gunicorn/settings.py; docs/patches.md).
"""

from __future__ import annotations

import contextlib
import errno
import html
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from gunicorn import util
from gunicorn.workers import gthread

from services.common.startup.patching import require_attributes, require_methods, require_parameters, require_version
from services.common.web.protocol_errors import PEEK_BYTES, error_response

PATCH = "gthread_worker"
PATCHED_VERSION = "27.0.1"  # gunicorn
# What Worker overrides or calls of gthread.ThreadWorker, and how it calls them.
OVERRIDDEN = {
    "accept": ("self", "listener"),
    "handle": ("self", "conn"),
    "handle_request": ("self", "req", "conn"),
    "handle_error": ("self", "req", "client", "addr", "exc"),
    "murder_pending": ("self",),
    "load_wsgi": ("self",),
    "on_pending_socket_readable": ("self", "conn", "client"),
    "handle_exit": ("self", "sig", "frame"),
}
HEAD_TIMEOUT_S = 5.0
NEXT_REQUEST_WAIT_S = 0.005
_before_stopping: list[Callable[[], None]] = []  # what SIGTERM runs while the worker still serves


def before_stopping(task: Callable[[], None]) -> None:
    """Run ``task`` on SIGTERM, in a thread, while the worker still serves; it stops once ``task`` ends
    (the inference service hands its sessions over meanwhile: services/inference/handover.py)."""
    _before_stopping.append(task)


def check() -> None:
    """Raise PatchError unless gunicorn's ``gthread`` is the one ``Worker`` was written against."""
    require_version("gunicorn", PATCHED_VERSION, PATCH)
    require_attributes(gthread, ("ThreadWorker", "TConn", "STOP_KEEPALIVE_LINGER"), PATCH)
    require_methods(gthread.ThreadWorker, OVERRIDDEN, PATCH)
    require_parameters(gthread.TConn, ("cfg", "sock", "client", "server"), PATCH)


class _ErrorPage:
    """Stands in for the client socket in gunicorn's ``handle_error``: keeps the page it writes."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.data = b""

    def sendall(self, data: bytes) -> None:
        self.data += data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def status_and_message(self) -> tuple[int, str]:
        """The status of gunicorn's page and its message (the text after the title)."""
        head, _, page = self.data.decode("latin-1").partition("\r\n\r\n")
        status = int(head.split()[1]) if head.startswith("HTTP/") else 500
        message = html.unescape(page.partition("</h1>")[2].partition("</body>")[0]).strip()
        return status, message or page.partition("<title>")[2].partition("</title>")[0]


def peek_path(sock: socket.socket) -> str | None:
    """The path of the request line waiting on ``sock``, if it is there to be seen (not consumed)."""
    try:
        start = sock.recv(PEEK_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return None
    target = start.split(b" ", 2)[1] if start.count(b" ") else b""
    return target.partition(b"?")[0].decode("latin-1") or None


def set_cork(sock: socket.socket, corked: bool) -> None:
    """Hold (or release) a TCP connection's partial segments (``TCP_CORK``; Linux); a closed or
    non-TCP socket is left as it is."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, corked)


def _readable_within(sock: socket.socket, seconds: float) -> bool:
    """Whether ``sock`` has data (or its end) within ``seconds`` (poll: any descriptor number)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(seconds * 1000))


class Worker(gthread.ThreadWorker):
    """``gthread`` whose threads serve only connections that are sending requests."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadlines: dict[gthread.TConn, float] = {}  # connections reading a request head
        self._request = threading.local()  # .path: the path peeked at, for handle_error; .corked: a socket
        self._busy_threads = 0  # pool threads serving or awaiting a request
        self._busy_lock = threading.Lock()

    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM: run the ``before_stopping`` tasks (once), serving meanwhile, then stop."""
        if not _before_stopping:
            super().handle_exit(sig, frame)
        elif not getattr(self, "_stopping_thread", None):
            self._stopping_thread = threading.Thread(target=self._run_before_stopping, name="before-stopping")
            self._stopping_thread.start()

    def _run_before_stopping(self) -> None:
        try:
            for task in _before_stopping:
                task()
        except Exception:
            self.log.exception("a task before stopping failed")
        finally:
            self.alive = False

    def accept(self, listener: socket.socket) -> None:
        """Park a new connection in the poller until it sends something (gunicorn's own path
        for connections that sent nothing in 5 s, taken at once)."""
        try:
            client_sock, client_addr = listener.accept()
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return
            raise
        self.nr_conns += 1
        conn = gthread.TConn(self.cfg, client_sock, client_addr, listener.getsockname())
        conn.timeout = time.monotonic() + self.cfg.keepalive
        self.pending_conns.append(conn)
        self.poller.register(client_sock, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn))

    def handle(self, conn: gthread.TConn) -> Any:
        """Serve the connection's request, and the ones that follow it at once."""
        self._count_busy(1)
        try:
            result = self._handle_one(conn)
            while result is True and self._next_request_soon(conn):
                result = self._handle_one(conn)
            return result
        finally:
            self._count_busy(-1)

    def _count_busy(self, change: int) -> None:
        with self._busy_lock:
            self._busy_threads += change

    def _next_request_soon(self, conn: gthread.TConn) -> bool:
        """Whether the kept-alive ``conn`` has its next request within ``NEXT_REQUEST_WAIT_S``
        (never while the worker stops, nor while half the threads or more are busy)."""
        if not self.alive or conn.is_http2 or self._busy_threads * 2 > self.cfg.threads:
            return False
        if conn.parser.unreader.buf.getvalue():  # read ahead with the last request's body
            return True
        if not _readable_within(conn.sock, NEXT_REQUEST_WAIT_S):
            return False
        self.log.debug("serving the next request of %s on the same thread", conn.client)
        return True

    def _handle_one(self, conn: gthread.TConn) -> Any:
        """Serve one request, with a deadline on reading its head."""
        self._head_deadlines[conn] = time.monotonic() + HEAD_TIMEOUT_S
        self._request.path = peek_path(conn.sock)
        try:
            return super().handle(conn)
        finally:
            self._head_deadlines.pop(conn, None)

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = self._corking(self.wsgi)

    def _corking(self, app: Any) -> Any:
        """``app``, whose responses of known length cork their connection (uncorked once the
        request is done, in ``handle_request``)."""

        def corking_app(environ: dict, start_response: Any) -> Any:
            def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
                if any(name.lower() == "content-length" for name, _ in headers):
                    self._request.corked = environ["gunicorn.socket"]
                    set_cork(self._request.corked, True)
                return start_response(status, headers, exc_info)

            return app(environ, start)

        return corking_app

    def handle_request(self, req: Any, conn: gthread.TConn) -> Any:
        self._head_deadlines.pop(conn, None)  # the head is complete
        try:
            return super().handle_request(req, conn)
        finally:
            if (corked := getattr(self._request, "corked", None)) is not None:
                self._request.corked = None
                set_cork(corked, False)  # what is still held leaves now

    def handle_error(self, req: Any, client: socket.socket, addr: Any, exc: BaseException) -> None:
        """gunicorn's status, message and log line for a refused request, answered as JSON."""
        page = _ErrorPage(client)
        super().handle_error(req, page, addr, exc)
        status, message = page.status_and_message()
        path = getattr(req, "path", None) or getattr(self._request, "path", None)
        with contextlib.suppress(OSError):
            util.write_nonblock(client, error_response(status, message, path))

    def murder_pending(self) -> None:
        """Called by the main loop about every second: also cut off overdue request heads, and
        when stopping, idle connections (else one idle client holds the worker for the whole
        graceful timeout: measured 60 s)."""
        if not self.alive:  # the same short linger gunicorn gives kept-alive connections
            linger = time.monotonic() + gthread.STOP_KEEPALIVE_LINGER
            for conn in self.pending_conns:
                conn.timeout = min(conn.timeout, linger)
        super().murder_pending()
        now = time.monotonic()
        for conn, deadline in self._head_deadlines.copy().items():
            if deadline < now and self._head_deadlines.pop(conn, None) is not None:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RD)  # the blocked read ends; gunicorn closes it
