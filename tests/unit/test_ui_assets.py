"""The chat page's files: its libraries come from node_modules at the versions package-lock.json
pins, a missing one stops the ui with one clear line, and the page with everything it loads stays
within its weight budget (gzipped, as served)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from services.common.startup.config import ConfigError
from services.ui.assets import LIBRARIES, NODE_MODULES, STATIC_DIR, load_static, render_page

# The page, its CSS and JavaScript and the libraries, gzipped as the ui serves them (docs/architecture.md).
WEIGHT_BUDGET_BYTES = 120 * 1024
UI_DIR = STATIC_DIR.parent


def test_the_page_and_its_libraries_fit_the_weight_budget():
    assets = load_static()
    page = render_page(assets, {"apiBaseUrl": "", "sessionMaxLength": 1024})
    sizes = {name: len(asset.gzipped or asset.body) for name, asset in {**assets, "index.html": page}.items()}
    total = sum(sizes.values())
    print(f"gzipped weight: {total} bytes of {WEIGHT_BUDGET_BYTES}", sizes)
    assert total <= WEIGHT_BUDGET_BYTES, sizes


def test_every_module_the_page_imports_is_served():
    assets = load_static()
    for name in [n for n in assets if n.endswith(".js")]:
        text = assets[name].body.decode()
        assert not re.findall(r'from "\./[\w.-]+";', text), f"{name} imports a module by an unversioned URL"
        for imported in re.findall(r'^import .* from "\./([\w.-]+)\?v=\w+";$', text, re.MULTILINE):
            assert imported in assets, f"{name} imports {imported}, which the ui does not serve"


def test_the_libraries_are_the_locked_versions():
    lock = json.loads((UI_DIR / "package-lock.json").read_text())
    declared = json.loads((UI_DIR / "package.json").read_text())["dependencies"]
    for package in {file.split("/lib/")[0].split("/dist/")[0].split("/es/")[0] for file in LIBRARIES.values()}:
        entry = lock["packages"][f"node_modules/{package}"]
        assert entry["version"] == declared[package] and entry["integrity"].startswith("sha512-")
        installed = json.loads((NODE_MODULES / package / "package.json").read_text())["version"]
        assert installed == entry["version"], f"{package}: installed {installed}, locked {entry['version']}"


def test_a_missing_library_stops_the_ui_with_one_line(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"marked\.esm\.js is missing: install the page's libraries"):
        load_static(node_modules=tmp_path)


def test_modules_import_each_other_by_versioned_url_and_the_page_preloads_them_all():
    assets = load_static()
    for name in [n for n in assets if n.endswith(".js")]:
        for imported, version in re.findall(
            r'^import .* from "\./([\w.-]+)\?v=(\w+)";$', assets[name].body.decode(), re.M
        ):
            assert version == assets[imported].digest, f"{name} imports {imported} at an old version"
    page = render_page(assets, {}).body.decode()
    classic = {"theme.js", "swarm_page.js"}  # classic scripts: the theme's, the status page's
    modules = {n for n in assets if n.endswith(".js") and n not in classic}
    preloaded = set(re.findall(r'<link rel="modulepreload" href="/static/([\w.-]+)\?v=', page))
    assert preloaded | {"chat.js"} == modules
