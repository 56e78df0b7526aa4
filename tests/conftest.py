"""Shared fixtures: the offline model, one real private swarm per test run, the oracle, services.

Helper functions live in tests/helpers.py and the API client in client/api.py (pytest advises
against importing from conftest).

Integration tests run against real processes on loopback: a Petals swarm of two servers that
split the model's blocks, and the inference service under gunicorn. The oracle is the same
weights in ``transformers``, in process.
"""

from __future__ import annotations

import codecs
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.api import Api
from deploy.local_stack import ServiceProcess, pick_free_port, ui_process
from services.swarm.launcher import PrivateSwarm
from services.swarm.tiny_bloom import ensure_tiny_bloom
from tests.helpers import CHATML_DESCRIPTION, CHATML_MODEL, DHT_PREFIX, start_gateway, start_inference

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]  # fmt: skip


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where logs and screenshots of this test run are kept."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium driven by Playwright (which never downloads a browser here)."""
    os.environ.setdefault("PLAYWRIGHT_BROWSERS_PATH", tempfile.mkdtemp(prefix="pw-"))
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_tiny_bloom()


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def oracle(model_dir: Path, tokenizer):
    """In-process greedy generation on the same weights: ``oracle(prompt or ids, n, **settings) -> new token ids``."""
    import torch
    from transformers import BloomForCausalLM

    model = BloomForCausalLM.from_pretrained(model_dir).eval()
    torch.set_num_threads(1)  # tiny model: with the services busy on the cores, 2 threads took 20x longer

    def generate(prompt: str | list[int], new_tokens: int, **kwargs) -> list[int]:
        """``kwargs``: more of transformers' generation settings (e.g. repetition_penalty)."""
        if isinstance(prompt, str):
            prompt = tokenizer(prompt, add_special_tokens=False).input_ids
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 **kwargs)  # fmt: skip
        return out[0, ids.shape[1] :].tolist()

    return generate


@pytest.fixture(scope="session")
def decode(tokenizer):
    """The one-shot decode the API's outputs must equal."""
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="session")
def decode_partial(tokenizer, decode):
    """What a session shows of ``ids`` while it may go on: the one-shot decode, less the last
    character if the tokens' bytes end in an incomplete UTF-8 sequence (a later token may complete it)."""
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    alphabet = {char: byte for byte, char in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)

    def partial(ids: list[int]) -> str:
        tokens = tokenizer.convert_ids_to_tokens([i for i in ids if i not in special])
        data = bytes(alphabet[char] for token in tokens for char in token)
        _, decodable = codecs.utf_8_decode(data, "replace", False)  # stops before an incomplete tail
        text = decode(ids)
        return text[:-1] if decodable < len(data) else text

    return partial


@pytest.fixture(scope="session")
def swarm(model_dir: Path, artifacts_dir: Path) -> Iterator[PrivateSwarm]:
    """Two Petals servers splitting the four blocks: every request crosses both."""
    with PrivateSwarm(model_dir, ["0:2", "2:4"], artifacts_dir / "swarm", dht_prefix=DHT_PREFIX) as running:
        yield running


@pytest.fixture(scope="session")
def inference(swarm: PrivateSwarm, model_dir: Path, artifacts_dir: Path) -> Iterator[ServiceProcess]:
    """The inference service with default settings."""
    service = start_inference(swarm, model_dir, artifacts_dir, "inference-0")
    yield service
    service.stop()


@pytest.fixture(scope="session")
def chatml_inference(swarm: PrivateSwarm, model_dir: Path, artifacts_dir: Path) -> Iterator[ServiceProcess]:
    """A second model on the test swarm: the same tiny BLOOM served as another model, in the ChatML
    format, so that routing by model is seen for real (its description holds markup, kept as text)."""
    service = start_inference(swarm, model_dir, artifacts_dir, "inference-chatml", MODEL_NAME=CHATML_MODEL,
                              CHAT_FORMAT="chatml", MODEL_DESCRIPTION=CHATML_DESCRIPTION)  # fmt: skip
    yield service
    service.stop()


@pytest.fixture(scope="session")
def gateway(inference: ServiceProcess, artifacts_dir: Path) -> Iterator[ServiceProcess]:
    """A gateway (two workers) in front of the shared inference service."""
    service = start_gateway(artifacts_dir, {"inference-0": inference.base_url}, "gateway")
    yield service
    service.stop()


@pytest.fixture(scope="session")
def ui(artifacts_dir: Path) -> Iterator[ServiceProcess]:
    """The ui service (stateless: the chat pages' tests share it behind their gateways)."""
    service = ui_process(port=pick_free_port(), log_path=artifacts_dir / "logs" / "ui.log").start_ready(timeout=60)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def api(inference: ServiceProcess) -> Api:
    """The v1 client of the shared inference service."""
    return Api(inference.base_url)
