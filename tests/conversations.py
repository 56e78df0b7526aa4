"""Sessions that converse while inference replicas stop, and what they would say uninterrupted.

Shared by the handover tests: tests/integration/test_handover.py (processes on loopback) and
tests/deploy/test_deploy.py (the chart's pods under podman). Each run opens its session with
``begin``, goes on one request at a time every ``pace_s`` in ``converse`` until told to stop (any
error raises: a client sees none), and says its ``text``; ``reference`` is the text an
uninterrupted run gives, from a ``Reference``. Greedy throughout.
"""

from __future__ import annotations

import threading
from typing import Protocol

import openai
from websockets.sync.client import ClientConnection

from client.api import Api, ask

SESSION_TOKENS, MOST_TOKENS = 512, 480  # a session's size, and where its client stops asking
ANSWER_TIMEOUT_S = 300.0  # a slow answer is no error (the gateway's upstream read timeout is 300 s)


class Reference(Protocol):
    """Where the uninterrupted texts come from."""

    chat: openai.OpenAI  # a client of the same stack, for the chat conversation run again

    def text(self, prompt: str, tokens: int) -> str:
        """The text of ``tokens`` greedy tokens after ``prompt``."""
        ...


class V1Session:
    """A v1 session generating one token per request."""

    def __init__(self, api: Api, prompt: str, pace_s: float) -> None:
        self.api, self.prompt, self.pace_s = api, prompt, pace_s
        self.outputs: list[str] = []
        self.session_id = ""

    def __repr__(self) -> str:
        return f"v1 {self.session_id} after {self.steps} tokens: {self.text()!r}"

    @property
    def steps(self) -> int:
        return len(self.outputs)

    def begin(self) -> None:
        self.session_id = self.api.open_session(SESSION_TOKENS)
        self.outputs.append(self.api.call("POST", "generate", self._fields(inputs=self.prompt))["outputs"])

    def holder(self) -> str:
        """The replica that opened the session (its id starts with the replica's name)."""
        return self.session_id.rpartition(".")[0]

    def converse(self, stop: threading.Event) -> None:
        while not stop.wait(self.pace_s) and self.steps < MOST_TOKENS:
            self.outputs.append(self.api.call("POST", "generate", self._fields())["outputs"])

    def _fields(self, **extra: str) -> dict:
        return {"session_id": self.session_id, "max_new_tokens": 1, **extra}

    def end(self) -> None:
        assert self.api.close_session(self.session_id) == {"ok": True}

    def text(self) -> str:
        return "".join(self.outputs)

    def reference(self, uninterrupted: Reference) -> str:
        return uninterrupted.text(self.prompt, self.steps)


class SocketSession(V1Session):
    """A WebSocket session asking two tokens per ``generate`` message."""

    def __init__(self, ws: ClientConnection, prompt: str, pace_s: float, label: str) -> None:
        self.ws, self.prompt, self.pace_s = ws, prompt, pace_s
        self.outputs, self.token_counts = [], []
        self.session_id = label

    @property
    def steps(self) -> int:
        return sum(self.token_counts)

    def begin(self) -> None:
        opening = {"type": "open_inference_session", "max_length": SESSION_TOKENS}
        assert ask(self.ws, opening, ANSWER_TIMEOUT_S) == {"ok": True}
        self._generate(inputs=self.prompt)

    def holder(self) -> str:
        return ""  # the connection keeps its session id to itself

    def converse(self, stop: threading.Event) -> None:
        while not stop.wait(self.pace_s) and self.steps < MOST_TOKENS:
            self._generate()

    def _generate(self, **extra: str) -> None:
        answer = ask(self.ws, {"type": "generate", "max_new_tokens": 2, **extra}, ANSWER_TIMEOUT_S)
        assert answer["ok"], answer
        self.outputs.append(answer["outputs"])
        self.token_counts.append(answer["token_count"])  # fewer than 2 when the model ends the text

    def end(self) -> None:
        self.ws.close()


class ChatSession:
    """An OpenAI chat conversation, one user message per turn, answers kept in the messages."""

    def __init__(self, client: openai.OpenAI, model: str, index: int, pace_s: float) -> None:
        self.client, self.model, self.index, self.pace_s = client, model, index, pace_s
        self.messages: list[dict[str, str]] = [{"role": "system", "content": f"You are assistant {index}."}]
        self.answers: list[str] = []
        self.cached: list[int] = []

    def __repr__(self) -> str:
        return f"chat {self.index}: {self.answers} (cached prompt tokens per turn: {self.cached})"

    @property
    def steps(self) -> int:
        return len(self.answers)

    def begin(self) -> None:
        self._turn()

    def holder(self) -> str:
        return ""

    def converse(self, stop: threading.Event) -> None:
        while not stop.wait(self.pace_s):
            self._turn()

    def end(self) -> None:
        """Nothing to close: a conversation session expires."""

    def text(self) -> str:
        """The answers, and the prompt tokens each turn found in the conversation's session: the
        same as without a restart, so the conversation went on in its session where it had moved."""
        return f"{self.answers} {self.cached}"

    def reference(self, uninterrupted: Reference) -> str:
        """The same conversation again, with no restart meanwhile."""
        again = ChatSession(uninterrupted.chat, self.model, self.index, self.pace_s)
        for _turn in range(self.steps):
            again.begin()
        return again.text()

    def _turn(self) -> None:
        self.messages.append({"role": "user", "content": f"Question {len(self.answers)}?"})
        answer = self.client.chat.completions.create(
            model=self.model, messages=self.messages, max_tokens=3, temperature=0
        )
        text = answer.choices[0].message.content
        self.messages.append({"role": "assistant", "content": text})
        self.answers.append(text)
        self.cached.append(answer.usage.prompt_tokens_details.cached_tokens)
