"""Request ids (services/common/web/request_id.py): which a client's are kept, the header on every answer
(HTTP and ASGI), the id on log lines and in internal-error answers."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re

import falcon
import falcon.testing
import pytest

from services.common.web import request_id
from services.common.web.app import create_app, create_asgi_app
from services.common.web.request_id import RequestIdFilter

FRESH = re.compile(r"^[0-9a-f]{32}$")  # a uuid4 in hex


@pytest.fixture(autouse=True)
def no_request_left():
    """A test app served in this thread leaves no request id behind for the next test."""
    yield
    request_id.end()


@pytest.mark.parametrize("value", ["abc-123", "a", "x" * 128, "0f:ab/cd_ef.{}[]~!", "A" * 32])
def test_a_valid_id_is_kept(value):
    assert request_id.accept(value) == value


@pytest.mark.parametrize("value", [None, "", "x" * 129, "a b", "line\nbreak", "tab\t", "caf\u00e9", "\x7f", "\x00"])
def test_any_other_is_replaced_by_a_fresh_one(value):
    assert FRESH.match(request_id.accept(value))


def test_fresh_ids_differ():
    assert request_id.new() != request_id.new()


def test_begin_sets_the_context_and_end_clears_it():
    def serve() -> tuple[str, str | None, dict[str, str]]:
        started = request_id.begin("abc-123")
        seen, headers = request_id.current(), request_id.outgoing_headers()
        request_id.end()
        assert request_id.current() is None and request_id.outgoing_headers() == {}
        return started, seen, headers

    assert contextvars.Context().run(serve) == ("abc-123", "abc-123", {"X-Request-Id": "abc-123"})


def lines(*filters: logging.Filter) -> tuple[logging.Logger, list[logging.LogRecord]]:
    """A logger whose records are kept, with ``filters`` on its handler."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    for line_filter in filters:
        handler.addFilter(line_filter)
    logger = logging.getLogger(f"test_request_id.{id(records)}")
    logger.propagate = False
    logger.addHandler(handler)
    return logger, records


def test_the_filter_names_the_request_once_and_only_within_one():
    logger, records = lines(RequestIdFilter(), RequestIdFilter())  # installed twice: still once a line

    def serve() -> None:
        logger.warning("outside")
        request_id.begin("abc-123")
        logger.warning("failed %s of %d", "step", 3)
        request_id.end()
        logger.warning("after")

    contextvars.Context().run(serve)
    assert [record.getMessage() for record in records] == ["outside", "failed step of 3 request_id=abc-123", "after"]


def failing_app(asgi: bool):
    """A service app (the shared middleware and handlers) with a route that logs then fails."""

    class Boom:
        def on_get(self, req, resp):
            logging.getLogger("test_request_id.app").warning("about to fail")
            raise RuntimeError("boom")

    class AsyncBoom:
        async def on_get(self, req, resp):
            Boom().on_get(req, resp)

    class V1Boom(Boom):
        error_envelope = "v1"

    make = create_asgi_app if asgi else create_app
    app = make(readiness=lambda: (True, {}), debug_tracebacks=False)
    app.add_route("/boom", AsyncBoom() if asgi else Boom())
    if not asgi:
        app.add_route("/api/v1/boom", V1Boom())
    return falcon.testing.TestClient(app)


@pytest.mark.parametrize("asgi", [False, True])
def test_every_answer_names_its_request_id(asgi):
    client = failing_app(asgi)
    assert client.simulate_get("/healthz", headers={"X-Request-Id": "abc-123"}).headers["X-Request-Id"] == "abc-123"
    assert FRESH.match(client.simulate_get("/healthz").headers["X-Request-Id"])
    invalid = client.simulate_get("/nowhere", headers={"X-Request-Id": "x" * 129})
    assert invalid.status_code == 404 and FRESH.match(invalid.headers["X-Request-Id"])


@pytest.mark.parametrize("asgi", [False, True])
def test_an_internal_error_names_its_incident_and_request_in_the_answer_and_the_log(asgi, caplog):
    caplog.handler.addFilter(RequestIdFilter())
    answer = failing_app(asgi).simulate_get("/boom", headers={"X-Request-Id": "abc-123"})
    assert answer.status_code == 500 and answer.headers["X-Request-Id"] == "abc-123"
    assert answer.json["error"]["code"] == "internal_error"
    incident = re.fullmatch(
        r"Internal error \(incident ([0-9a-f]{12}), request abc-123\); the operators can find it in the logs\.",
        answer.json["error"]["message"],
    ).group(1)
    logged = [record.getMessage() for record in caplog.records]
    assert "about to fail request_id=abc-123" in logged
    assert f"unhandled error (incident {incident}) on GET /boom request_id=abc-123" in logged


def test_the_v1_shape_is_kept(caplog):
    answer = failing_app(asgi=False).simulate_get("/api/v1/boom", headers={"X-Request-Id": "abc-123"})
    assert answer.status_code == 200 and answer.headers["X-Petals-Chat-Status"] == "500"
    assert set(answer.json) == {"ok", "traceback"} and answer.json["ok"] is False
    assert "request abc-123" in answer.json["traceback"]


def test_the_gateway_sends_the_current_id_on_its_calls_and_none_outside_a_request():
    """Upstream (every call from the gateway to a replica or the ui) adds the header by itself."""
    from aiohttp import web

    from services.gateway.upstream import Upstream

    async def calls() -> list[str | None]:
        seen: list[str | None] = []

        async def record(request: web.Request) -> web.Response:
            seen.append(request.headers.get("X-Request-Id"))
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_get("/readyz", record)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        upstream = Upstream(connect_timeout_s=5, read_timeout_s=5)
        await upstream.start()
        try:
            await upstream.request("inference-9", url, "GET", "/readyz")  # e.g. the poller's
            request_id.begin("abc-123")
            await upstream.request("inference-9", url, "GET", "/readyz", headers={"Accept": "application/json"})
        finally:
            await upstream.close()
            await runner.cleanup()
        return seen

    assert contextvars.Context().run(asyncio.run, calls()) == [None, "abc-123"]


def test_a_replicas_stream_that_fails_ends_with_an_error_event_naming_the_request(caplog):
    """The replica's streamed answer (its generation runs after the headers left) names the id too."""
    from services.inference.resources import _sse_chunks

    def failing():
        raise RuntimeError("the swarm said no")
        yield  # a generator

    def serve() -> list[bytes]:
        request_id.begin("abc-123")
        return list(_sse_chunks(failing()))

    (event,) = contextvars.Context().run(serve)
    assert event.startswith(b"event: error") and b"internal_error" in event and b"request abc-123)" in event
    assert caplog.records[-1].exc_info[1].args == ("the swarm said no",)
