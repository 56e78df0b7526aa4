"""A model card: what an inference replica says about the model it serves.

Each replica publishes its card in its ``/readyz`` (``model_card``); the gateway routes by its
``name``, renders OpenAI chat prompts with its chat format (and ``chat_template``, when the
operator set one), and lists the cards in ``GET /v1/models``, where the chat page finds the
models, their descriptions, formats and default settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from services.common.chat.formats import ChatFormat


@dataclass(frozen=True)
class GenerationDefaults:
    """The chat page's initial generation settings for a model."""

    do_sample: bool = True
    temperature: float = 0.75
    top_p: float = 0.9
    max_new_tokens: int = 256

    @classmethod
    def from_json(cls, data: Any) -> GenerationDefaults:
        if not isinstance(data, dict):
            raise ValueError("defaults must be an object")
        do_sample, temperature, top_p, tokens = (data.get(f.name) for f in dataclasses.fields(cls))
        numbers_ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (temperature, top_p))
        if not isinstance(do_sample, bool) or not numbers_ok or not isinstance(tokens, int) or isinstance(tokens, bool):
            raise ValueError("defaults must have do_sample (bool), temperature, top_p (numbers), max_new_tokens (int)")
        return cls(do_sample, float(temperature), float(top_p), tokens)


@dataclass(frozen=True)
class ModelCard:
    """One served model: its public name, a one-line description, its chat format and defaults."""

    name: str
    description: str
    chat: ChatFormat
    defaults: GenerationDefaults
    max_length: int  # the most tokens a session may hold (MAX_LENGTH_LIMIT, within what the servers hold)
    chat_template: str | None = None  # the operator's Jinja2 chat template (None: the default one)

    def public_json(self) -> dict[str, Any]:
        """What clients see (``GET /v1/models``): everything but the template's source."""
        return {
            "name": self.name,
            "description": self.description,
            "chat": self.chat.to_json(),
            "defaults": dataclasses.asdict(self.defaults),
            "max_length": self.max_length,
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.public_json(), "chat_template": self.chat_template}

    @classmethod
    def from_json(cls, data: Any) -> ModelCard:
        """Parse ``to_json``'s output; ValueError if it is malformed."""
        if not isinstance(data, dict):
            raise ValueError("model card must be an object")
        name, description, max_length = data.get("name"), data.get("description"), data.get("max_length")
        template = data.get("chat_template")
        if not isinstance(name, str) or not name or not isinstance(description, str):
            raise ValueError("model card must have a name and a description (strings)")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ValueError("model card max_length must be a positive integer")
        if template is not None and not isinstance(template, str):
            raise ValueError("model card chat_template must be a string or null")
        chat, defaults = ChatFormat.from_json(data.get("chat")), GenerationDefaults.from_json(data.get("defaults"))
        return cls(name, description, chat, defaults, max_length, template)
