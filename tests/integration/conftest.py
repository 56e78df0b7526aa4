"""SmolLM2-135M-Instruct fixtures the oracle tests share (test_smollm2_oracle.py, test_batching_oracle.py):
the model's folder and tokenizer, the model in process and its greedy oracle, and the raw Petals client on
the requesting module's own ``smol_swarm``."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.swarm.launcher import PrivateSwarm
from services.swarm.smollm2 import ensure_smollm2
from tests.helpers import SMOL_DHT_PREFIX, SMOL_NEW_TOKENS


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    return ensure_smollm2()


@pytest.fixture(scope="module")
def smol_tokenizer(smol_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="module")
def smol_model(smol_dir: Path):
    """The model in process, float32, one thread."""
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)  # two threads on two busy cores ran 20x slower
    return LlamaForCausalLM.from_pretrained(smol_dir, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smol_oracle(smol_model):
    """In-process greedy generation: ``oracle(ids) -> new ids`` (up to and including ``<|im_end|>``)."""
    import torch

    model = smol_model

    def generate(ids: list[int]) -> list[int]:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=SMOL_NEW_TOKENS, do_sample=False)
        return out[0, len(ids) :].tolist()

    return generate


@pytest.fixture(scope="module")
def smol_client(smol_dir: Path, smol_swarm: PrivateSwarm):
    """The raw Petals client (embeddings and the tied LM head here, the 30 blocks on the module's
    ``smol_swarm``: each module that uses it defines that swarm)."""
    import torch
    from petals import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(
        smol_dir, initial_peers=smol_swarm.initial_peers, dht_prefix=SMOL_DHT_PREFIX, torch_dtype=torch.float32
    ).eval()
    yield model
    sequence_manager = model.transformer.h.sequence_manager
    sequence_manager.shutdown()
    sequence_manager.dht.shutdown()
