"""Chat messages rendered to a model's prompt by a Jinja2 template, in Jinja2's sandbox.

The template language is the one Hugging Face chat templates use (``messages``,
``add_generation_prompt``, ``raise_exception``). A template sees the model's ChatFormat by name
(``system_start``, ``user_end``, ...; ``default_system_prompt`` is its system prompt), so the
default one writes every format, and an operator's own (``CHAT_TEMPLATE`` of a replica) can
use them too. An assistant message renders as its start, its content exactly and its end, so a
follow-up request extends the previous prompt plus the answer as it was generated: that is what
lets the inference service continue the conversation's session.

The replica checks its template at start-up; the gateway renders the routed model's prompts.
"""

from __future__ import annotations

import functools
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.common.chat.formats import ChatFormat
from services.common.startup.config import ConfigError
from services.common.web.errors import InvalidParameter

DEFAULT_CHAT_TEMPLATE = (
    "{%- if messages[0].role != 'system' and default_system_prompt -%}"
    "{{ system_start }}{{ default_system_prompt }}{{ system_end }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{{ system_start }}{{ message.content }}{{ system_end }}"
    "{%- elif message.role == 'user' -%}{{ user_start }}{{ message.content }}{{ user_end }}"
    "{%- else -%}{{ assistant_start }}{{ message.content }}{{ assistant_end }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ assistant_start }}{%- endif -%}"
)


class ChatTemplate:
    """A compiled chat template; ``render`` turns validated messages into a prompt."""

    def __init__(self, source: str = DEFAULT_CHAT_TEMPLATE) -> None:
        self._source = source
        environment = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise ConfigError(f"CHAT_TEMPLATE is not a valid Jinja2 template: {error} (line {error.lineno})") from None

    def check(self, chat_format: ChatFormat) -> None:
        """Fail at start-up, not on the first request: ConfigError unless a one-message chat renders."""
        try:
            self.render([{"role": "user", "content": "Hi"}], chat_format)
        except InvalidParameter as error:
            raise ConfigError(f"CHAT_TEMPLATE fails on a one-message chat: {error.message}") from None

    @property
    def takes_tools(self) -> bool:
        """Whether the template writes OpenAI's ``tools`` itself (Hugging Face's tool-calling templates)."""
        return "tools" in self._source

    def render(self, messages: list[dict[str, Any]], chat_format: ChatFormat, tools: list | None = None) -> str:
        """The prompt for ``messages``, ending where the model's answer begins (``tools``: for a template
        that ``takes_tools``)."""
        variables = {**chat_format.to_json(), "default_system_prompt": chat_format.system_prompt}
        if self.takes_tools:
            variables["tools"] = tools
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True, raise_exception=_raise_exception, **variables
            )
        except jinja2.TemplateError as error:
            message = f"The chat template cannot render these messages: {error}"
            raise InvalidParameter(message, param="messages") from None


@functools.lru_cache(maxsize=16)
def compiled(source: str | None) -> ChatTemplate:
    """The template of ``source`` (None: the default one), compiled once."""
    return ChatTemplate(DEFAULT_CHAT_TEMPLATE if source is None else source)


def _raise_exception(message: str) -> None:
    """What Hugging Face chat templates call to reject a conversation (e.g. roles out of order)."""
    raise jinja2.TemplateError(message)
