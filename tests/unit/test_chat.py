"""Chat formats, the chat template that renders them, a replica's chat settings and its model card."""

from __future__ import annotations

import dataclasses

import pytest

from services.common.api.params import Limits
from services.common.chat.formats import CHATML, HUMAN_AI, ChatFormat
from services.common.chat.model_card import GenerationDefaults, ModelCard
from services.common.chat.template import ChatTemplate, compiled
from services.common.startup.config import ConfigError, Env
from services.common.web.errors import InvalidParameter
from services.inference.chat_config import ChatSettings, detect_chat_format
from services.inference.settings import InferenceSettings

DIALOGUE = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": " Hello"},
    {"role": "user", "content": "Bye"},
]


def test_human_ai_renders_the_original_chat_format():
    preamble = dataclasses.replace(HUMAN_AI, system_prompt="Preamble.")
    assert compiled(None).render(DIALOGUE, preamble) == "Preamble.\n\nHuman: Hi\n\nAI: Hello\n\nHuman: Bye\n\nAI:"
    system = [{"role": "system", "content": "Own."}, {"role": "user", "content": "Hi"}]
    assert compiled(None).render(system, HUMAN_AI) == "Own.\n\nHuman: Hi\n\nAI:"


def test_chatml_renders_what_smollm2s_own_template_does(chatml_tokenizer):
    smollm2 = detect_chat_format(chatml_tokenizer)
    own = chatml_tokenizer.apply_chat_template(DIALOGUE, add_generation_prompt=True, tokenize=False)
    assert compiled(None).render(DIALOGUE, smollm2) == own
    assert own.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.parametrize("chat_format", [HUMAN_AI, CHATML])
def test_a_follow_up_prompt_extends_the_previous_prompt_plus_its_answer(chat_format):
    first = [{"role": "user", "content": "Hi"}]
    answer = " Hello there"
    follow_up = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "More"}]
    rendered = compiled(None).render(follow_up, chat_format)
    assert rendered.startswith(compiled(None).render(first, chat_format) + answer + chat_format.stop[0])


@pytest.mark.parametrize("chat_format", [HUMAN_AI, CHATML])
def test_stop_then_next_turn_is_the_assistant_end_and_user_start(chat_format):
    """What the chat page relies on: an answer that stopped at ``stop`` (or ended with the model's
    end-of-turn token) is followed by the rest of the assistant's end and the next user turn."""
    between = chat_format.assistant_end + chat_format.user_start
    assert between.startswith(chat_format.stop[0]) and between.startswith(chat_format.end_of_turn)


def test_custom_template_and_its_errors():
    template = ChatTemplate(
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system here') }}{% endif %}"
        "{{ user_start if m.role == 'user' else '' }}{{ m.content }}{% endfor %}{{ assistant_start }}"
    )
    assert template.render([{"role": "user", "content": "Hi"}], CHATML) == "<|im_start|>user\nHi<|im_start|>assistant\n"
    with pytest.raises(InvalidParameter, match="no system here"):
        template.render([{"role": "system", "content": "x"}], CHATML)
    with pytest.raises(ConfigError, match="not a valid Jinja2 template"):
        ChatTemplate("{% for %}")
    with pytest.raises(ConfigError, match="fails on a one-message chat"):
        ChatTemplate("{{ undefined_variable }}").check(HUMAN_AI)


def test_the_format_follows_the_tokenizers_chat_template(tokenizer, chatml_tokenizer):
    assert detect_chat_format(tokenizer) == HUMAN_AI  # tiny BLOOM has no template of its own
    smollm2 = detect_chat_format(chatml_tokenizer)
    assert dataclasses.replace(smollm2, system_prompt=CHATML.system_prompt) == CHATML
    assert smollm2.system_prompt == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat_settings(**env: str) -> ChatSettings:
    return ChatSettings.from_env(Env(env), Limits())


def test_chat_settings_pick_and_override_the_format(tokenizer, chatml_tokenizer):
    assert chat_settings().resolve(chatml_tokenizer).name == "chatml"
    assert chat_settings(CHAT_FORMAT="chatml").resolve(tokenizer) == CHATML
    custom = chat_settings(CHAT_FORMAT="human-ai", CHAT_SYSTEM_PROMPT="Be brief.", CHAT_STOP="\\n\\nUser:")
    assert custom.resolve(chatml_tokenizer) == dataclasses.replace(HUMAN_AI, system_prompt="Be brief.",
                                                                   stop=("\n\nUser:",))  # fmt: skip
    none = chat_settings(CHAT_SYSTEM_PROMPT="none", CHAT_STOP="none").resolve(tokenizer)
    assert (none.system_prompt, none.stop) == ("", ())


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CHAT_FORMAT": "alpaca"}, "CHAT_FORMAT must be one of auto, human-ai, chatml"),
        ({"CHAT_TEMPLATE": "{% if %}"}, "not a valid Jinja2 template"),
        ({"CHAT_TEMPLATE": "x", "CHAT_TEMPLATE_FILE": "/y"}, "not both"),
        ({"CHAT_TEMPLATE_FILE": "/no/such/file"}, "cannot be read"),
        ({"CHAT_STOP": "x" * 65}, "at most 64 characters"),
        ({"CHAT_TEMPERATURE": "0"}, "CHAT_TEMPERATURE must be >= 0.05"),
        ({"CHAT_MAX_NEW_TOKENS": "5000"}, "CHAT_MAX_NEW_TOKENS must be <= 1024"),
    ],
)
def test_bad_chat_settings_are_rejected(env, message):
    with pytest.raises(ConfigError, match=message):
        chat_settings(**env)


def test_the_model_card_round_trips_and_hides_the_template(tokenizer):
    env = {"MODEL": "/models/tiny", "MODEL_NAME": "tiny", "MODEL_DESCRIPTION": "A tiny one.", "CHAT_TEMPLATE": "x"}
    settings = InferenceSettings.from_env(Env(env))
    card = settings.model_card(settings.chat.resolve(tokenizer))
    assert card == ModelCard("tiny", "A tiny one.", HUMAN_AI, GenerationDefaults(), 2048, "x")
    assert ModelCard.from_json(card.to_json()) == card
    assert "chat_template" not in card.public_json()
    assert ChatFormat.from_json(CHATML.to_json()) == CHATML


@pytest.mark.parametrize(
    "broken",
    [None, {"name": ""}, {"max_length": 0}, {"chat": {"name": 1}}, {"defaults": {"do_sample": 1}}],
)
def test_a_malformed_card_is_a_value_error(broken):
    valid = ModelCard("m", "", CHATML, GenerationDefaults(), 64).to_json()
    with pytest.raises(ValueError):
        ModelCard.from_json(None if broken is None else {**valid, **broken})


def test_model_name_is_checked():
    with pytest.raises(ConfigError, match="MODEL_NAME must be"):
        InferenceSettings.from_env(Env({"MODEL": "/models/x", "MODEL_NAME": "bad name"}))
