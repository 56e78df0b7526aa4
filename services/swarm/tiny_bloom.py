"""Build a tiny, deterministic BLOOM model offline (no model hub needed).

The model is random-weight but fully real: a byte-level BPE tokenizer trained on a small
multilingual corpus shipped with the project, and a ``BloomForCausalLM`` saved in BLOOM's
checkpoint layout (keys ``h.N.*``, ``word_embeddings.*``, ``ln_f.*``), which is the layout
Petals servers load blocks from. The same directory serves the swarm servers, the Petals
client in the inference service, and the in-process oracle the tests compare against.

Building is deterministic (fixed seed) and cached: ``ensure_tiny_bloom(cache_dir)`` builds
once per configuration and returns the cached directory afterwards.
CLI: ``python -m services.swarm.tiny_bloom [cache_dir]`` prints the model directory.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from services.swarm.model_cache import build_atomically

CORPUS = Path(__file__).with_name("data") / "corpus.txt"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # BLOOM's ids 0..3
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache" / "models"


@dataclass(frozen=True)
class TinyBloomSpec:
    """Shape of the generated model; every field is part of the cache key."""

    n_layer: int = 4
    hidden_size: int = 64
    n_head: int = 4
    vocab_size: int = 600
    seed: int = 1234
    # A wide init spreads the logits, so greedy argmax margins are far above the float
    # rounding differences between the swarm's cached attention and in-process generate.
    initializer_range: float = 0.25
    format_version: int = 1

    def cache_key(self) -> str:
        """A short hash of the spec and the corpus, naming the cache directory."""
        payload = json.dumps(asdict(self), sort_keys=True).encode() + CORPUS.read_bytes()
        return hashlib.sha256(payload).hexdigest()[:12]


def train_tokenizer(vocab_size: int):
    """Train a byte-level BPE tokenizer on the bundled corpus, wrapped for BLOOM."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import BloomTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(CORPUS)], trainer)
    return BloomTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
    )


def build_tiny_bloom(destination: Path, spec: TinyBloomSpec = TinyBloomSpec()) -> Path:
    """Write tokenizer + BLOOM checkpoint (Petals' block layout) into ``destination``."""
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    tokenizer = train_tokenizer(spec.vocab_size)
    config = BloomConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        initializer_range=spec.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["BloomForCausalLM"],
    )
    torch.manual_seed(spec.seed)
    model = BloomForCausalLM(config).eval()
    destination.mkdir(parents=True, exist_ok=True)
    # Save the inner BloomModel: keys without the "transformer." prefix, as BLOOM ships them.
    model.transformer.save_pretrained(destination, safe_serialization=True)
    config.architectures = ["BloomForCausalLM"]  # save_pretrained set it to the inner class
    config.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
    (destination / "tiny_bloom_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return destination


def ensure_tiny_bloom(cache_dir: Path = DEFAULT_CACHE_DIR, spec: TinyBloomSpec = TinyBloomSpec()) -> Path:
    """Return the cached model directory for ``spec``, building it first if needed."""
    target = Path(cache_dir) / f"tiny-bloom-{spec.cache_key()}"
    if (target / "config.json").exists():
        return target
    return build_atomically(target, lambda staging: build_tiny_bloom(staging, spec))


if __name__ == "__main__":
    print(ensure_tiny_bloom(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CACHE_DIR))
