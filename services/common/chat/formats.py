"""How a model's dialogue is written: one ``ChatFormat`` per model, shared by the chat page and the
OpenAI-compatible chat API, so a conversation reads alike whichever way it arrives.

A dialogue is a system message (the format's ``system_prompt`` when the chat brings none), then
user and assistant turns, each written as ``<start><content><end>``; the prompt ends with the
assistant's start, where the model's answer begins. An answer ends at one of the ``stop``
sequences, or when the model emits its end-of-sequence token, which for a format with an
``end_of_turn`` stands for that text (ChatML's ``<|im_end|>``). Two presets:

- ``human-ai``, the original Petals chat's format (BLOOM-style models)::

      A human talks to a powerful AI that follows the human's instructions.

      Human: Hi!

      AI: Hello! How can I help?

- ``chatml`` (SmolLM2 and most instruct models)::

      <|im_start|>system
      You are a helpful AI assistant.<|im_end|>
      <|im_start|>user
      Hi!<|im_end|>
      <|im_start|>assistant
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

DEFAULT_PREAMBLE = "A human talks to a powerful AI that follows the human's instructions."


@dataclass(frozen=True)
class ChatFormat:
    """The strings a model's dialogue is built from."""

    name: str
    system_prompt: str  # the system message of a chat that has none ("": none)
    system_start: str
    system_end: str
    user_start: str
    user_end: str
    assistant_start: str
    assistant_end: str
    stop: tuple[str, ...]  # sequences that end an answer
    end_of_turn: str = ""  # the text the model's end-of-sequence token stands for ("": none)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "stop": list(self.stop)}

    @classmethod
    def from_json(cls, data: Any) -> ChatFormat:
        """Parse ``to_json``'s output; ValueError if it is malformed."""
        if not isinstance(data, dict):
            raise ValueError("chat format must be an object")
        values = {}
        for field in dataclasses.fields(cls):
            value = data.get(field.name)
            if field.name == "stop":
                if not isinstance(value, list) or not all(isinstance(stop, str) and stop for stop in value):
                    raise ValueError("chat format stop must be a list of strings")
                value = tuple(value)
            elif not isinstance(value, str):
                raise ValueError(f"chat format {field.name} must be a string")
            values[field.name] = value
        return cls(**values)

    def with_overrides(self, *, system_prompt: str | None, stop: tuple[str, ...] | None) -> ChatFormat:
        """This format with the operator's system prompt and stop sequences, where set."""
        return dataclasses.replace(
            self,
            system_prompt=self.system_prompt if system_prompt is None else system_prompt,
            stop=self.stop if stop is None else stop,
        )


HUMAN_AI = ChatFormat(
    name="human-ai",
    system_prompt=DEFAULT_PREAMBLE,
    system_start="",
    system_end="\n\n",
    user_start="Human: ",
    user_end="\n\n",
    assistant_start="AI:",
    assistant_end="\n\n",
    stop=("\n\nHuman:",),
)
CHATML = ChatFormat(
    name="chatml",
    system_prompt="You are a helpful AI assistant.",
    system_start="<|im_start|>system\n",
    system_end="<|im_end|>\n",
    user_start="<|im_start|>user\n",
    user_end="<|im_end|>\n",
    assistant_start="<|im_start|>assistant\n",
    assistant_end="<|im_end|>\n",
    stop=("<|im_end|>",),
    end_of_turn="<|im_end|>",
)
PRESETS = {preset.name: preset for preset in (HUMAN_AI, CHATML)}
