"""The one-token CPU LM heads give the stock head's logits; the row split leaves torch's threads as they were."""

from __future__ import annotations

import threading

import pytest
import torch

from services.inference import lm_head


class Head(torch.nn.Module):
    """The shape of Petals' LMHead: a weight and a forward."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden_states, self.weight)


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(lm_head, "MIN_WEIGHT_BYTES", 0)


def _new_thread_torch_threads() -> int:
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_one_token_logits_equal_the_stock_heads(small_threshold):
    head = Head(torch.randn(1001, 64))
    hidden = torch.randn(1, 1, 64)
    expected = head(hidden)
    split = lm_head.install(head, threads=3)
    assert split is not None
    with torch.inference_mode():
        logits = head.forward(hidden)
    assert logits.shape == expected.shape == (1, 1, 1001)
    torch.testing.assert_close(logits, expected)
    split.close()


def test_prompts_and_autograd_take_the_stock_path(small_threshold):
    head = Head(torch.randn(100, 16))
    split = lm_head.install(head, threads=2)
    prompt = torch.randn(1, 5, 16)
    with torch.inference_mode():
        torch.testing.assert_close(head.forward(prompt), torch.nn.functional.linear(prompt, head.weight))
    split.close()


def test_a_bfloat16_heads_one_token_logits_are_the_stock_heads_bit_for_bit(small_threshold):
    head = Head(torch.randn(5003, 96).to(torch.bfloat16))
    hidden = torch.randn(1, 1, 96).to(torch.bfloat16)
    with torch.inference_mode():
        expected = head(hidden)
        one_token = lm_head.install(head, threads=2)
        logits = head.forward(hidden)
    assert isinstance(one_token, lm_head.OneTokenLMHead) and not isinstance(one_token, lm_head.RowSplitLMHead)
    assert logits.shape == expected.shape == (1, 1, 5003) and logits.dtype == torch.bfloat16
    assert torch.equal(logits, expected)


def chunked(head: Head) -> Head:
    head.use_chunked_forward = True  # Petals' head on a CPU without AVX-512: bfloat16 in float32 chunks
    return head


@pytest.mark.parametrize(
    ("head", "threads"),
    [
        (Head(torch.zeros(10, 4)), 2),
        (Head(torch.zeros(2**16, 32, dtype=torch.bfloat16)), 2),
        (chunked(Head(torch.zeros(2**20, 32, dtype=torch.bfloat16))), 2),
        (Head(torch.zeros(2**20, 32)), 1),
    ],
    ids=["too small", "bfloat16 too small", "bfloat16 in chunks", "one thread"],
)
def test_install_declines_where_it_would_not_gain(head, threads):
    assert lm_head.install(head, threads) is None


def test_the_pool_leaves_the_default_thread_count_alone(small_threshold):
    main_thread = torch.get_num_threads()
    before = _new_thread_torch_threads()
    split = lm_head.install(Head(torch.randn(10, 4)), threads=3)
    assert _new_thread_torch_threads() == before and torch.get_num_threads() == main_thread
    assert split._pool.submit(torch.get_num_threads).result() == 1
    split.close()


def _observed() -> list[int]:
    return []


@pytest.mark.parametrize("threads", [1, 3], ids=["stock head", "row split"])
def test_batched_heads_give_each_token_its_logits(small_threshold, threads):
    head = Head(torch.randn(1001, 64))
    sizes = _observed()
    batched = lm_head.install(head, threads=threads, batch_observer=sizes.append)
    assert isinstance(batched, lm_head.StockOneTokenLMHead if threads == 1 else lm_head.RowSplitLMHead)
    hidden = torch.randn(5, 1, 64)
    with torch.inference_mode():
        alone = head.forward(hidden[:1])
        together = batched._together(hidden[:, 0])
    assert sizes == [1] and alone.shape == (1, 1, 1001)
    torch.testing.assert_close(alone[0, 0], torch.nn.functional.linear(hidden[0, 0], head.weight))
    torch.testing.assert_close(together, torch.nn.functional.linear(hidden[:, 0], head.weight))
    assert torch.equal(together.argmax(-1), torch.nn.functional.linear(hidden[:, 0], head.weight).argmax(-1))
    batched.close()


def test_without_batching_small_heads_keep_the_stock_forward():
    head = Head(torch.zeros(10, 4))
    assert lm_head.install(head, threads=2, batch_observer=None) is None
