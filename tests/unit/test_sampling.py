"""The seeded sampler: reproducible per request, and it respects top-k."""

from __future__ import annotations

import torch

from services.inference.sampling import SeededSampler


def draws(sampler: SeededSampler, scores: torch.Tensor, steps: int) -> list[int]:
    return [int(sampler(None, scores).argmax()) for _ in range(steps)]


def test_same_seed_same_tokens_other_seed_other_tokens():
    scores = torch.zeros(1, 50)  # uniform: every token equally likely
    first = draws(SeededSampler(1.0, None, None, seed=7), scores, 20)
    assert draws(SeededSampler(1.0, None, None, seed=7), scores, 20) == first
    assert draws(SeededSampler(1.0, None, None, seed=8), scores, 20) != first


def test_only_the_sampled_token_stays_possible():
    out = SeededSampler(0.7, None, 0.9, seed=1)(None, torch.randn(1, 10))
    assert torch.isfinite(out).sum() == 1


def test_top_k_limits_the_choice():
    scores = torch.arange(10, dtype=torch.float).unsqueeze(0)
    assert set(draws(SeededSampler(5.0, 2, None, seed=3), scores, 30)) <= {8, 9}
