"""Staging the embedded models for the image build (services/swarm/image_models.py)."""

from __future__ import annotations

import os
import stat

from services.swarm import image_models


def make_model(path, weights: bytes = b"w" * 100):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(weights)
    os.chmod(path / "model.safetensors", 0o600)  # as safetensors writes it
    return path


def test_staged_copy_is_readable_by_anyone_with_fixed_times(tmp_path):
    source = make_model(tmp_path / "src")
    target = tmp_path / "stage" / "m"
    assert image_models.stage_model(source, target) is True
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    for path in (target, *target.iterdir()):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), path
        assert int(path.stat().st_mtime) == image_models.FIXED_MTIME
    assert (target / "model.safetensors").read_bytes() == b"w" * 100
    assert image_models.stage_model(source, target) is False  # unchanged: nothing copied
    (source / "model.safetensors").write_bytes(b"v" * 100)  # a rebuilt model is staged again
    assert image_models.stage_model(source, target) is True
    assert (target / "model.safetensors").read_bytes() == b"v" * 100


def test_stage_all_stages_every_embedded_model_and_nothing_else(tmp_path, monkeypatch):
    sources = {name: make_model(tmp_path / "cache" / name) for name in ("a", "b")}
    monkeypatch.setattr(image_models, "EMBEDDED", {name: (lambda _cache, p=p: p) for name, p in sources.items()})
    stage = tmp_path / "stage"
    make_model(stage / "old")
    staged = image_models.stage_all(stage, tmp_path / "cache")
    assert staged == {"a": stage / "a", "b": stage / "b"}
    assert sorted(p.name for p in stage.iterdir()) == ["a", "b"]


def test_the_embedded_models_are_the_charts_defaults():
    import yaml

    values = yaml.safe_load((image_models.REPO_ROOT / "charts" / "petals-chat" / "values.yaml").read_text())
    assert {m["path"] for m in values["models"]} == {f"{image_models.IMAGE_DIR}/{n}" for n in image_models.EMBEDDED}
