"""The documentation holds together: links and anchors resolve, no issue numbers, every setting and
module is documented where a reader looks for it. Reads files only (no network, no processes)."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])
READER_DOCS = [path for path in DOCS if path.name != "CHANGELOG.md"]  # the changelog may name past modules
CONFIGURATION = ROOT / "docs" / "configuration.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
ISSUE_REFERENCE = re.compile(r"\bissues?\s+#?\d+|(?<![\w&/#])#\d+\b", re.IGNORECASE)
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]{2,}$")
ENV_ACCESSORS = {"str", "text", "int", "float", "bool", "list", "choice", "get", "getenv", "_raw"}
MODULE_PATH = re.compile(r"services/[A-Za-z0-9_/]+(?:\.[A-Za-z0-9_]+)*\.py\b")


def prose(text: str) -> str:
    """The text without fenced code blocks (a link or an anchor there is code, not a link)."""
    return FENCE.sub("", text)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercase, punctuation dropped, spaces as hyphens."""
    text = INLINE_CODE.sub(lambda match: match.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file, with GitHub's -1, -2 ... for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for match in HEADING.finditer(prose(path.read_text())):
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> Iterator[str]:
    """The targets of the file's Markdown links and images, outside code."""
    text = INLINE_CODE.sub("", prose(path.read_text()))
    for match in LINK.finditer(text):
        yield match.group(1)


def test_the_documents_exist():
    names = {path.relative_to(ROOT).as_posix() for path in DOCS}
    for name in ("README.md", "CHANGELOG.md", "docs/api.md", "docs/architecture.md", "docs/configuration.md",
                 "docs/deploying.md", "docs/operating.md", "docs/benchmarks.md", "docs/testing.md",
                 "docs/patches.md"):  # fmt: skip
        assert name in names, name


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_relative_links_and_anchors_resolve(path: Path):
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            broken.append(f"{target}: no file {destination.relative_to(ROOT)}")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading with anchor #{anchor} in {destination.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_no_issue_numbers(path: Path):
    found = [match.group(0) for match in ISSUE_REFERENCE.finditer(path.read_text())]
    assert not found, f"{path.name} refers to issues by number: {found}"


def env_names_read(paths: list[Path]) -> dict[str, str]:
    """Environment variables the code reads: ``env.int("NAME", ...)`` and the Env reader's other
    methods, ``os.environ.get("NAME")``, ``os.environ["NAME"]``, ``os.getenv("NAME")``, a module's
    ``..._ENV = "NAME"`` constant, and the local stack's per-model ``setting="NAME"``."""
    found: dict[str, str] = {}
    for path in paths:
        where = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[object] = []
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
                receiver = ast.unparse(node.func.value)
                if node.func.attr in ENV_ACCESSORS and (
                    receiver == "env" or receiver.endswith("environ") or receiver == "os"
                ):
                    names.append(getattr(node.args[0], "value", None))
            elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
                if ast.unparse(node.value).endswith("environ"):
                    names.append(getattr(node.slice, "value", None))
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                if any(isinstance(target, ast.Name) and target.id.endswith("_ENV") for target in node.targets):
                    names.append(node.value.value)
            elif isinstance(node, ast.keyword) and node.arg == "setting" and isinstance(node.value, ast.Constant):
                names.append(node.value.value)
            for name in names:
                if isinstance(name, str) and ENV_NAME.match(name):
                    found.setdefault(name, where)
    return found


def service_sources() -> list[Path]:
    """The services' modules and the local runner's (its settings are documented with theirs)."""
    return [
        *sorted((ROOT / "services").rglob("*.py")),
        ROOT / "deploy" / "run_local.py",
        ROOT / "deploy" / "local_stack.py",
    ]


def test_the_env_scan_finds_the_settings():
    """The scan itself works: settings read in each of its ways are found."""
    names = env_names_read(service_sources())
    expected = ["MODEL", "INFERENCE_REPLICAS", "API_KEYS_FILE", "PROMETHEUS_MULTIPROC_DIR", "TRACEMALLOC_DIR"]
    expected += [
        "SWARM_BOOTSTRAP_WAIT_SECONDS",
        "SWARM_SMALL_TENSOR_BYTES",
        "LOCAL_MODELS",
        "LOCAL_SWARM_BLOCKS_SMOLLM2",
    ]
    for name in expected:
        assert name in names, name
    assert "OMP_NUM_THREADS" not in names  # set for the servers, never read


def test_every_environment_variable_is_in_the_configuration_reference():
    text = CONFIGURATION.read_text()
    missing = sorted(
        f"{name} ({where})"
        for name, where in env_names_read(service_sources()).items()
        if not re.search(rf"\b{name}\b", text)
    )
    assert not missing, f"not in {CONFIGURATION.relative_to(ROOT)}: {', '.join(missing)}"


def flattened_values(values: object, prefix: str = "") -> Iterator[str]:
    """A values file's keys as dotted paths, down to its leaves; a map of labels (keys with '/' or
    '.', e.g. a nodeSelector), an empty map and a list are leaves."""
    if not isinstance(values, dict) or not values or any("/" in str(key) or "." in str(key) for key in values):
        yield prefix
        return
    for key, value in values.items():
        yield from flattened_values(value, f"{prefix}.{key}" if prefix else str(key))


def test_flattening_the_values():
    values = {"a": {"b": 1, "c": {}}, "d": [1], "e": {"nodeSelector": {"x.io/y": "1"}}}
    assert list(flattened_values(values)) == ["a.b", "a.c", "d", "e.nodeSelector"]


@pytest.mark.parametrize("values_file", sorted(ROOT.glob("charts/*/values.yaml")), ids=lambda path: path.parent.name)
def test_every_chart_value_is_in_the_configuration_reference(values_file: Path):
    text = CONFIGURATION.read_text()
    keys = list(flattened_values(yaml.safe_load(values_file.read_text())))
    assert len(keys) > 50
    missing = [key for key in keys if f"`{key}`" not in text]
    assert not missing, f"not in {CONFIGURATION.relative_to(ROOT)}: {', '.join(missing)}"


def modules() -> set[str]:
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "services").rglob("*.py")
        if path.name != "__init__.py" and "__pycache__" not in path.parts
    }


def test_the_architecture_names_every_module():
    named = set(MODULE_PATH.findall(ARCHITECTURE.read_text()))
    missing = sorted(modules() - named)
    assert not missing, f"{ARCHITECTURE.relative_to(ROOT)} does not name: {', '.join(missing)}"


@pytest.mark.parametrize("path", READER_DOCS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_no_document_names_a_module_that_does_not_exist(path: Path):
    named = set(MODULE_PATH.findall(path.read_text()))
    absent = sorted(name for name in named if not (ROOT / name).is_file())
    assert not absent, f"{path.relative_to(ROOT)} names modules that do not exist: {', '.join(absent)}"
