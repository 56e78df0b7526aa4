"""A replica whose client-side layers run in bfloat16 (the default on a CPU with AMX) generates what
the bare Petals client does in bfloat16 on the same swarm, token for token: its own decoding loop
changes no logit. (The tiny BLOOM's head is below the size at which the replica installs its
``torch.mv`` head; tests/unit/test_lm_head.py proves that head's logits equal the stock head's.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from client.api import Api
from deploy.local_stack import ServiceProcess
from services.inference import petals_compat
from services.swarm.launcher import PrivateSwarm
from tests.helpers import DHT_PREFIX, start_inference

PROMPTS = ["A human talks to a powerful AI", "Human: Hi! Can you tell me what Petals is?\n\nAI:"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def bfloat16_inference(swarm: PrivateSwarm, model_dir: Path, artifacts_dir: Path) -> Iterator[ServiceProcess]:
    service = start_inference(swarm, model_dir, artifacts_dir, "bfloat16-inference", TORCH_DTYPE="bfloat16")
    yield service
    service.stop()


@pytest.fixture(scope="module")
def bare_client(swarm: PrivateSwarm, model_dir: Path, tokenizer):
    """``generate(prompt) -> new token ids``: Petals' own ``generate`` in bfloat16, in this process."""
    import torch
    from petals import AutoDistributedModelForCausalLM

    petals_compat.install()
    model = AutoDistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers=swarm.initial_peers, dht_prefix=DHT_PREFIX, torch_dtype=torch.bfloat16
    )

    def generate(prompt: str) -> list[int]:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return out[0, ids.shape[1] :].tolist()

    yield generate
    sequence_manager = model.transformer.h.sequence_manager
    sequence_manager.shutdown()
    sequence_manager.dht.shutdown()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_one_call_equals_the_bare_client(bfloat16_inference, bare_client, decode, prompt):
    body = Api(bfloat16_inference.base_url).generate(inputs=prompt, max_new_tokens=NEW_TOKENS)
    assert body == {"ok": True, "outputs": decode(bare_client(prompt))}


def test_one_token_per_call_equals_the_bare_client(bfloat16_inference, bare_client, decode_partial):
    api = Api(bfloat16_inference.base_url)
    prompt = PROMPTS[1]
    session_id = api.open_session(max_length=128)
    pieces = [api.generate(inputs=prompt, max_new_tokens=1, session_id=session_id)["outputs"]]
    for _ in range(NEW_TOKENS - 1):
        pieces.append(api.generate(max_new_tokens=1, session_id=session_id)["outputs"])
    api.close_session(session_id)
    assert "".join(pieces) == decode_partial(bare_client(prompt))
