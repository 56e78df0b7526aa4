"""The row-split CPU LM head gives the stock head's logits and leaves torch's threads as they were."""

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


@pytest.mark.parametrize(
    ("weight", "threads"),
    [(torch.zeros(10, 4), 2), (torch.zeros(2**20, 32, dtype=torch.bfloat16), 2), (torch.zeros(2**20, 32), 1)],
    ids=["too small", "bfloat16", "one thread"],
)
def test_install_declines_where_it_would_not_gain(weight, threads):
    assert lm_head.install(Head(weight), threads) is None


def test_the_pool_leaves_the_default_thread_count_alone(small_threshold):
    main_thread = torch.get_num_threads()
    before = _new_thread_torch_threads()
    split = lm_head.install(Head(torch.randn(10, 4)), threads=3)
    assert _new_thread_torch_threads() == before and torch.get_num_threads() == main_thread
    assert split._pool.submit(torch.get_num_threads).result() == 1
    split.close()
