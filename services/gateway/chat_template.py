"""Chat messages rendered to the model's prompt, with a configurable Jinja2 template.

The template language is the one Hugging Face chat templates use (``messages``,
``add_generation_prompt``), run in Jinja2's sandbox. The default speaks the format of the
chat page (see services/common/chat.py), which suits BLOOM-style base and instruction models:

    A human talks to a powerful AI that follows the human's instructions.

    Human: Hi!

    AI: Hello! How can I help?

    Human: What is Petals?

    AI:

An assistant message renders as ``AI:`` followed by its content exactly, and turns are joined
by the separator, so a follow-up request extends the previous prompt plus the answer as it was
generated: that is what lets the inference service continue the conversation's session.
"""

from __future__ import annotations

from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.common.chat import AI_PREFIX, DEFAULT_PREAMBLE, HUMAN_PREFIX, TURN_SEPARATOR
from services.common.config import ConfigError
from services.common.errors import InvalidParameter

DEFAULT_CHAT_TEMPLATE = (
    "{%- if messages[0].role != 'system' and default_system_prompt -%}"
    "{{ default_system_prompt }}{{ separator }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{{ message.content }}"
    "{%- elif message.role == 'user' -%}{{ human_prefix }}{{ message.content }}"
    "{%- else -%}{{ ai_prefix }}{{ message.content }}"
    "{%- endif -%}"
    "{%- if not loop.last or add_generation_prompt -%}{{ separator }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ai_prefix }}{%- endif -%}"
)
DEFAULT_CHAT_STOP = TURN_SEPARATOR + HUMAN_PREFIX.strip()


class ChatTemplate:
    """A compiled chat template; ``render`` turns validated messages into a prompt."""

    def __init__(self, source: str, default_system_prompt: str = DEFAULT_PREAMBLE) -> None:
        environment = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise ConfigError(f"CHAT_TEMPLATE is not a valid Jinja2 template: {error} (line {error.lineno})") from None
        self._variables = {
            "default_system_prompt": default_system_prompt,
            "separator": TURN_SEPARATOR,
            "human_prefix": HUMAN_PREFIX,
            "ai_prefix": AI_PREFIX,
            "raise_exception": _raise_exception,
        }
        try:  # fail at start-up, not on the first request
            self.render([{"role": "user", "content": "Hi"}])
        except InvalidParameter as error:
            raise ConfigError(f"CHAT_TEMPLATE fails on a one-message chat: {error.message}") from None

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt for ``messages``, ending where the model's answer begins."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self._variables)
        except jinja2.TemplateError as error:
            message = f"The chat template cannot render these messages: {error}"
            raise InvalidParameter(message, param="messages") from None


def _raise_exception(message: str) -> None:
    """What Hugging Face chat templates call to reject a conversation (e.g. roles out of order)."""
    raise jinja2.TemplateError(message)
