"""Fakes for the inference service's unit tests: token bytes, a Petals session, a clock, a stepper."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

E_ACUTE = (200, 201)  # the two tokens whose bytes make "é"


class ByteTable(dict):
    """Token bytes: ids below 128 stand for their ASCII character; ``E_ACUTE`` for the halves of "é"."""

    def __missing__(self, token_id: int) -> bytes:
        return bytes([token_id]) if token_id < 128 else b""


TOKEN_BYTES = ByteTable({E_ACUTE[0]: b"\xc3", E_ACUTE[1]: b"\xa9"})


class FakePetalsSession:
    """The part of ``petals.client.InferenceSession`` the service uses: the tokens held, ``close``."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.ids: list[int] = []
        self.closed = False

    @property
    def output_ids(self) -> Any:
        import torch

        return torch.tensor([self.ids]) if self.ids else None

    def close(self) -> None:
        self.closed = True


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def next_token(held: list[int]) -> int:
    """The fake model's greedy choice: a letter (ASCII 97-122) that depends on every token held."""
    return 97 + (sum(held) * 7 + len(held)) % 26


def oracle(prompt: list[int], new_tokens: int) -> list[int]:
    """What the fake model generates after ``prompt`` when nothing fails."""
    held = list(prompt)
    for _ in range(new_tokens):
        held.append(next_token(held))
    return held[len(prompt) :]


class FakeStepper:
    """A ``SwarmStepper`` over a fake model: ``next_token`` one step at a time; the calls
    named in ``failures`` (call number -> tokens generated before it fails) raise as a broken server does."""

    def __init__(self, failures: dict[int, int] | None = None, *, ready: bool = True) -> None:
        self.failures = failures or {}
        self.ready = ready
        self.sent: list[list[int]] = []  # the token ids each call sent through the swarm
        self.opened: list[FakePetalsSession] = []

    def swarm_ready(self) -> bool:
        return self.ready

    def open_petals_session(self, max_length: int) -> FakePetalsSession:
        self.opened.append(FakePetalsSession(max_length))
        return self.opened[-1]

    def logits_processors(self, params: Any, options: Any, start: int, reader: Any = None) -> None:
        return None

    def decode_all(self, token_ids: list[int]) -> str:
        return "".join(map(chr, token_ids))

    def generate(
        self, petals_session: FakePetalsSession, token_ids: list[int], max_new_tokens: int, processors: Any
    ) -> Iterator[int]:
        fail_after = self.failures.get(len(self.sent))
        self.sent.append(list(token_ids))
        petals_session.ids.extend(token_ids)
        for step in range(max_new_tokens):
            if step == fail_after:
                raise RuntimeError("Broken input cache")
            petals_session.ids.append(next_token(petals_session.ids))
            yield petals_session.ids[-1]
