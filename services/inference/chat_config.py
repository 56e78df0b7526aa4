"""A replica's chat configuration: the chat format its model speaks, and its model card.

``CHAT_FORMAT`` picks a preset (``human-ai`` or ``chatml``); left at ``auto``, the model's own
tokenizer decides once it is loaded: ChatML when its chat template writes ChatML (with the
template's default system prompt), the Human/AI format otherwise. ``CHAT_SYSTEM_PROMPT`` and
``CHAT_STOP`` override the format's, ``CHAT_TEMPLATE`` / ``CHAT_TEMPLATE_FILE`` replace the way the
OpenAI chat endpoint renders messages, ``CHAT_TEMPERATURE``, ``CHAT_TOP_P`` and
``CHAT_MAX_NEW_TOKENS`` are the chat page's initial settings.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.api.params import MAX_STOP_CHARS, Limits
from services.common.chat.formats import CHATML, HUMAN_AI, PRESETS, ChatFormat
from services.common.chat.model_card import GenerationDefaults
from services.common.chat.template import ChatTemplate
from services.common.startup.config import ConfigError, Env

logger = logging.getLogger(__name__)
AUTO = "auto"
_CHATML_PROBE = re.compile(
    r"(?:<\|im_start\|>system\n(?P<system>.*?)<\|im_end\|>\n)?"
    r"<\|im_start\|>user\nHi<\|im_end\|>\n<\|im_start\|>assistant\n",
    re.DOTALL,
)


@dataclass(frozen=True)
class ChatSettings:
    """The CHAT_* settings of a replica."""

    format: str  # "auto" or a preset's name
    system_prompt: str | None  # None: the format's
    stop: tuple[str, ...] | None  # None: the format's
    template: str | None  # None: the default template
    defaults: GenerationDefaults

    @classmethod
    def from_env(cls, env: Env, limits: Limits) -> ChatSettings:
        """CHAT_FORMAT, CHAT_SYSTEM_PROMPT, CHAT_STOP, CHAT_TEMPLATE(_FILE), CHAT_TEMPERATURE, CHAT_TOP_P,
        CHAT_MAX_NEW_TOKENS."""
        chat_format = env.choice("CHAT_FORMAT", AUTO, (AUTO, *PRESETS))
        template = read_chat_template(env)
        if template is not None:
            ChatTemplate(template).check(PRESETS.get(chat_format, HUMAN_AI))
        system_prompt = env.text("CHAT_SYSTEM_PROMPT", "") or None
        defaults = GenerationDefaults(
            temperature=env.float("CHAT_TEMPERATURE", GenerationDefaults.temperature, minimum=0.05, maximum=2.0),
            top_p=env.float("CHAT_TOP_P", GenerationDefaults.top_p, minimum=0.05, maximum=1.0),
            max_new_tokens=env.int(
                "CHAT_MAX_NEW_TOKENS",
                min(GenerationDefaults.max_new_tokens, limits.max_new_tokens),
                minimum=1,
                maximum=limits.max_new_tokens,
            ),
        )
        return cls(
            format=chat_format,
            system_prompt="" if system_prompt == "none" else system_prompt,
            stop=parse_chat_stop(env.text("CHAT_STOP", "")),
            template=template,
            defaults=defaults,
        )

    def resolve(self, tokenizer: Any) -> ChatFormat:
        """The format this replica's model speaks, with the operator's overrides."""
        base = detect_chat_format(tokenizer) if self.format == AUTO else PRESETS[self.format]
        return base.with_overrides(system_prompt=self.system_prompt, stop=self.stop)


def detect_chat_format(tokenizer: Any) -> ChatFormat:
    """ChatML (with its template's system prompt) when the tokenizer's own chat template writes
    ChatML; the Human/AI format otherwise (also for a tokenizer with no template of its own)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return HUMAN_AI
    try:
        probe = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}], chat_template=template, add_generation_prompt=True, tokenize=False
        )
    except Exception:
        logger.warning("the tokenizer's chat template fails on a one-message chat; using human-ai", exc_info=True)
        return HUMAN_AI
    match = _CHATML_PROBE.fullmatch(probe)
    if match is None:
        logger.info("the tokenizer's chat template is not ChatML; using human-ai")
        return HUMAN_AI
    return dataclasses.replace(CHATML, system_prompt=match.group("system") or "")


def read_chat_template(env: Env) -> str | None:
    """CHAT_TEMPLATE (Jinja2 source), or the file CHAT_TEMPLATE_FILE names, or None."""
    inline, path = env.str("CHAT_TEMPLATE", ""), env.str("CHAT_TEMPLATE_FILE", "")
    if inline and path:
        raise ConfigError("Set CHAT_TEMPLATE or CHAT_TEMPLATE_FILE, not both")
    if not path:
        return inline or None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"CHAT_TEMPLATE_FILE {path!r} cannot be read: {error}") from None


def parse_chat_stop(value: str) -> tuple[str, ...] | None:
    """CHAT_STOP: the chat's stop sequence (unset: the format's; ``none``: no stop sequence)."""
    if not value:
        return None
    if value == "none":
        return ()
    if len(value) > MAX_STOP_CHARS:
        raise ConfigError(f"CHAT_STOP must be at most {MAX_STOP_CHARS} characters, got {len(value)}")
    return (value,)
