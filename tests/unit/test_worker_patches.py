"""The server workers' subclasses of gunicorn's and uvicorn's internals are fenced: each refuses
another library version or a missing method with one line, the installed versions pass, and a
misfit stops gunicorn's master as it reads its config."""

from __future__ import annotations

import pytest
from gunicorn.workers import gthread
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.common.gunicorn import gthread_worker
from services.common.gunicorn.settings import check_or_exit, service_config
from services.common.startup.patching import PatchError
from services.gateway import http_protocol
from tests.unit.fences import assert_refused, pretend_version, refusal

VERSIONS = [
    (gthread_worker, "gunicorn", gthread_worker.PATCHED_VERSION),
    (http_protocol, "uvicorn", http_protocol.PATCHED_VERSIONS["uvicorn"]),
    (http_protocol, "websockets", http_protocol.PATCHED_VERSIONS["websockets"]),
]


@pytest.mark.parametrize("module", [gthread_worker, http_protocol], ids=["gthread_worker", "http_protocol"])
def test_the_installed_versions_fit(module):
    module.check()


@pytest.mark.parametrize(("module", "dist", "version"), VERSIONS, ids=["gunicorn", "uvicorn", "websockets"])
def test_another_version_is_refused_in_one_line(monkeypatch, module, dist, version):
    pretend_version(monkeypatch, dist)
    assert_refused(module.check, refusal(module.PATCH, dist, version))


@pytest.mark.parametrize(
    ("module", "owner", "name"),
    [(gthread_worker, gthread.ThreadWorker, "murder_pending"), (http_protocol, HttpToolsProtocol, "send_400_response")],
    ids=["gthread_worker", "http_protocol"],
)
def test_a_missing_method_is_refused(monkeypatch, module, owner, name):
    monkeypatch.delattr(owner, name)
    where = f"{owner.__module__}.{owner.__qualname__}.{name}"
    assert_refused(module.check, f"{module.PATCH} patches {where}, which is missing; see docs/patches.md")


def test_a_method_of_another_signature_is_refused(monkeypatch):
    def handle_request(self, conn, req): ...

    monkeypatch.setattr(gthread.ThreadWorker, "handle_request", handle_request)
    with pytest.raises(RuntimeError, match=r"handle_request\(self, req, conn\), found parameters \(self, conn, req\)"):
        gthread_worker.check()


def test_a_misfit_stops_the_master_with_the_line(monkeypatch, capsys):
    pretend_version(monkeypatch, "gunicorn")
    with pytest.raises(SystemExit) as stopped:
        check_or_exit(gthread_worker.check, "ui")
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"ui: {refusal('gthread_worker', 'gunicorn', gthread_worker.PATCHED_VERSION)}\n"


def test_service_config_checks_the_worker_after_the_settings(monkeypatch, capsys):
    def misfit() -> None:
        raise PatchError("http_protocol", "uvicorn 0.54.0, found 0.0.1")

    with pytest.raises(SystemExit):
        service_config("gateway", object, "services.gateway.app:create_app()", check_worker=misfit)
    assert capsys.readouterr().err.startswith("gateway: http_protocol patches uvicorn 0.54.0, found 0.0.1;")
