"""Shared fixtures: the offline model, one real private swarm per test run, the oracle, services.

Integration tests run against real processes on loopback: a Petals swarm of two servers that
split the model's blocks, and the inference service under gunicorn. The oracle is the same
weights in ``transformers``, in process.
"""

from __future__ import annotations

import codecs
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from deploy.local_stack import ServiceProcess, gateway_process, inference_process, pick_free_port
from services.swarm.launcher import PrivateSwarm
from services.swarm.tiny_bloom import ensure_tiny_bloom

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
DHT_PREFIX = "petals-chat-test"
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


def start_inference(swarm: PrivateSwarm, model_dir: Path, artifacts_dir: Path, name: str, **env: str) -> ServiceProcess:
    """Start an inference service on the test swarm and wait until it is ready."""
    service = inference_process(
        model_dir=model_dir,
        initial_peers=swarm.initial_peers,
        dht_prefix=DHT_PREFIX,
        port=pick_free_port(),
        log_path=artifacts_dir / "logs" / f"{name}.log",
        replica_id=name,
        extra_env={"READINESS_INTERVAL_SECONDS": "1", **env},
    )
    return service.start_ready(timeout=180)


@pytest.fixture(scope="session")
def inference(swarm: PrivateSwarm, model_dir: Path, artifacts_dir: Path) -> Iterator[ServiceProcess]:
    """The inference service with default settings."""
    service = start_inference(swarm, model_dir, artifacts_dir, "inference-0")
    yield service
    service.stop()


CHATML_MODEL = "tiny-bloom-chatml"
CHATML_DESCRIPTION = "Tiny BLOOM again, spoken to in ChatML <b>(a second model)</b>"


@pytest.fixture(scope="session")
def chatml_inference(swarm: PrivateSwarm, model_dir: Path, artifacts_dir: Path) -> Iterator[ServiceProcess]:
    """A second model on the test swarm: the same tiny BLOOM served as another model, in the ChatML
    format, so that routing by model is seen for real (its description holds markup, kept as text)."""
    service = start_inference(swarm, model_dir, artifacts_dir, "inference-chatml", MODEL_NAME=CHATML_MODEL,
                              CHAT_FORMAT="chatml", MODEL_DESCRIPTION=CHATML_DESCRIPTION)  # fmt: skip
    yield service
    service.stop()


def start_gateway(artifacts_dir: Path, replica_urls: dict[str, str], name: str, **env: str) -> ServiceProcess:
    """Start a gateway routing to the given replicas and wait until one of them is ready."""
    gateway = gateway_process(
        replicas=replica_urls,
        port=pick_free_port(),
        log_path=artifacts_dir / "logs" / f"{name}.log",
        name=name,
        extra_env={"REPLICA_POLL_INTERVAL_SECONDS": "0.5", **env},
    )
    return gateway.start_ready(timeout=60)


@pytest.fixture(scope="session")
def gateway(inference: ServiceProcess, artifacts_dir: Path) -> Iterator[ServiceProcess]:
    """A gateway (two workers) in front of the shared inference service."""
    service = start_gateway(artifacts_dir, {"inference-0": inference.base_url}, "gateway")
    yield service
    service.stop()


def metric_value(metrics_text: str, name: str) -> float:
    """One sample's value from Prometheus text (``name`` with its labels, if any); 0 if absent."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", metrics_text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


class Api:
    """A tiny client for the v1 API (real HTTP)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = requests.Session()

    def generate(self, **params) -> dict:
        response = self.http.post(f"{self.base_url}/api/v1/generate", data=params, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    def open_session(self, max_length: int) -> str:
        body = self.http.get(f"{self.base_url}/api/v1/open_inference_session", params={"max_length": max_length}).json()
        assert body["ok"], body
        return body["session_id"]

    def close_session(self, session_id: str) -> dict:
        return self.http.get(
            f"{self.base_url}/api/v1/close_inference_session", params={"session_id": session_id}
        ).json()

    def metrics(self) -> str:
        return self.http.get(f"{self.base_url}/metrics", timeout=10).text


@pytest.fixture(scope="session")
def api(inference: ServiceProcess) -> Api:
    return Api(inference.base_url)
