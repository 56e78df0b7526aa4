"""The inference worker's patches are fenced: installed at start-up, each refuses another library
version or a missing attribute with one line, and the installed versions pass."""

from __future__ import annotations

import petals.client.inference_session as inference_session
import pytest
import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from petals.client.lm_head import LMHead

from services.inference import app, lm_head, model, patches, petals_compat, step_packing
from tests.unit.fences import assert_refused, pretend_version, refusal

# patch module, the (distribution, version) pairs it is fenced to, an (owner, attribute) it needs
FENCES = [
    (petals_compat, petals_compat.PATCHED_VERSIONS, (RemoteExpertWorker, "_event_thread")),
    (step_packing, {"petals": step_packing.PATCHED_VERSION}, (inference_session, "pack_args_kwargs")),
    (lm_head, {"petals": lm_head.PATCHED_VERSION}, (LMHead, "chunked_forward")),
]
fenced = pytest.mark.parametrize(("module", "versions", "needed"), FENCES, ids=[fence[0].PATCH for fence in FENCES])


@pytest.fixture
def uninstalled(monkeypatch):
    """The client module's functions restored after the test, and the patches not yet installed."""
    for name in step_packing.REPLACED:
        monkeypatch.setattr(inference_session, name, getattr(inference_session, name))
    monkeypatch.setattr(
        inference_session._ServerInferenceSession, "close", inference_session._ServerInferenceSession.close
    )
    monkeypatch.setattr(step_packing, "_installed", False)
    monkeypatch.setattr(petals_compat, "_installed", False)


@fenced
def test_the_installed_versions_fit(module, versions, needed):
    module.check()


@fenced
def test_another_version_is_refused_in_one_line(monkeypatch, module, versions, needed):
    for dist, version in versions.items():
        with monkeypatch.context() as patched:
            pretend_version(patched, dist)
            assert_refused(module.check, refusal(module.PATCH, dist, version))


@fenced
def test_a_missing_attribute_is_refused(monkeypatch, module, versions, needed):
    owner, name = needed
    monkeypatch.delattr(owner, name)
    with pytest.raises(
        RuntimeError, match=rf"^{module.PATCH} patches .*\.{name}, which is missing; see docs/patches\.md$"
    ):
        module.check()


def test_step_packing_refuses_a_serializer_of_another_signature(monkeypatch, uninstalled):
    def serialize_torch_tensor(tensor, compression=0): ...

    monkeypatch.setattr(inference_session, "serialize_torch_tensor", serialize_torch_tensor)
    with pytest.raises(
        RuntimeError,
        match=r"serialize_torch_tensor\(tensor, compression_type\), found parameters \(tensor, compression\)",
    ):
        step_packing.check()


def test_lm_head_refuses_a_head_that_no_longer_sets_use_chunked_forward(monkeypatch):
    monkeypatch.setattr(LMHead, "__init__", lambda self, config: None)
    with pytest.raises(RuntimeError, match=r"LMHead\.use_chunked_forward, which is no longer set"):
        lm_head.check()


def test_a_refused_install_patches_nothing(monkeypatch, uninstalled):
    before = {name: getattr(inference_session, name) for name in step_packing.REPLACED}
    close = inference_session._ServerInferenceSession.close
    pretend_version(monkeypatch, "petals")
    assert_refused(patches.install, refusal("petals_compat", "petals", petals_compat.PATCHED_VERSIONS["petals"]))
    assert_refused(step_packing.install, refusal("step_packing", "petals", step_packing.PATCHED_VERSION))
    assert {name: getattr(inference_session, name) for name in step_packing.REPLACED} == before
    assert inference_session._ServerInferenceSession.close is close


def test_lm_head_install_refuses_before_replacing_the_forward(monkeypatch):
    head = torch.nn.Linear(4, 8, bias=False)
    forward = head.forward
    pretend_version(monkeypatch, "petals")
    assert_refused(lambda: lm_head.install(head, threads=2), refusal("lm_head", "petals", lm_head.PATCHED_VERSION))
    assert head.forward == forward


def test_patches_install_installs_them_all(uninstalled):
    patches.install()
    assert inference_session.BatchTensorDescriptor is step_packing.StepTensorSchema
    assert inference_session._ServerInferenceSession.close.__module__ == petals_compat.__name__


def test_the_app_factory_stops_on_a_refused_patch_before_the_service_starts(monkeypatch, uninstalled):
    monkeypatch.setenv("MODEL", "/models/tiny-bloom")
    monkeypatch.setattr(app, "_service", None)
    monkeypatch.setattr(app, "configure_logging", lambda level: None)
    pretend_version(monkeypatch, "petals")
    assert_refused(app.create_app, refusal("petals_compat", "petals", petals_compat.PATCHED_VERSIONS["petals"]))
    assert app._service is None  # nothing loads, nothing retries: gunicorn's worker fails to boot


def test_the_loading_loop_does_not_retry_a_refused_patch(monkeypatch):
    from services.common.startup.config import Env
    from services.common.startup.patching import PatchError
    from services.inference.settings import InferenceSettings

    handle = model.ModelHandle(InferenceSettings.from_env(Env({"MODEL": "/models/tiny-bloom"})))
    loads = []

    def load() -> None:
        loads.append(1)
        raise PatchError("lm_head", "petals 2.2.0.post1, found 0.0.1")

    monkeypatch.setattr(handle, "_load", load)
    handle._run()  # returns: no retry
    assert loads == [1]
    assert handle.readiness() == (
        False,
        "model loading failed: lm_head patches petals 2.2.0.post1, found 0.0.1; see docs/patches.md",
    )
