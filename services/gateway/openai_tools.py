"""OpenAI's function calling (``tools``, ``tool_choice``, ``parallel_tool_calls``) on models without it.

A chat request's tools are offered to the model in the Hermes format that Qwen's and NousResearch's
templates use (docs/api.md "Tools"): the function signatures in the system message, and each call
written as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. A chat template
that takes ``tools`` itself (an operator's ``CHAT_TEMPLATE`` that names them) gets them instead.
The model's output is constrained by a grammar (services/common/api/grammar.py): with
``tool_choice`` ``required`` or a named function it can only call (that) function, with ``auto``
it writes either text or calls; the arguments always match the function's parameter schema, and
are written compactly, so that a follow-up request that sends the calls back renders the text
the model produced and continues its session. ``ToolCallParser`` turns the output, as it streams,
into OpenAI's content and ``tool_calls`` deltas.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from services.common.api.grammar import JSON_OPTIONS, bounded, lark_grammar
from services.common.chat.model_card import ModelCard
from services.common.chat.template import compiled
from services.common.web.errors import InvalidParameter

CALL_START = "<tool_call>\n"
CALL_END = "\n</tool_call>"
CALL_SEPARATOR = "\n"
MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(frozen=True)
class Tool:
    """One function the model may call."""

    name: str
    description: str
    parameters: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """OpenAI's tool object, as the model reads it."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """The tools a request offers and what the model may do with them."""

    tools: tuple[Tool, ...]
    mode: str  # "auto", "required" or "named"
    named: str | None  # the one function of "named"
    parallel: bool

    def grammar(self) -> str:
        """llguidance's grammar of the answers this choice allows."""
        callable_tools = [tool for tool in self.tools if self.named in (None, tool.name)]
        rules = [f'fn_{i}: {_literal(_call_head(tool.name))} args_{i} "}}"' for i, tool in enumerate(callable_tools)]
        rules += [f"args_{i}: %json {_schema_json(tool.parameters)}" for i, tool in enumerate(callable_tools)]
        calls = f"call ({_literal(CALL_SEPARATOR)} call)*" if self.parallel else "call"
        start = "TEXT | calls" if self.mode == "auto" else "calls"
        alternatives = " | ".join(f"fn_{i}" for i in range(len(callable_tools)))
        lark = "\n".join(
            [
                f"start: {start}",
                f"calls: {calls}",
                f"call: {_literal(CALL_START)} ({alternatives}) {_literal(CALL_END)}",
                *rules,
                r"TEXT: /[^<](.|\n)*/",  # text: anything that does not open a call
            ]
        )
        return lark_grammar(lark, "tools")

    def system_text(self) -> str:
        """The tools' part of the system message."""
        return _INSTRUCTIONS.format(tools="\n".join(json.dumps(tool.to_json()) for tool in self.tools))


def parse_tool_choice(body: dict[str, Any]) -> ToolChoice | None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls``; None when no tool may be called."""
    tools = _tools(body.get("tools"))
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise InvalidParameter("parallel_tool_calls must be true or false", param="parallel_tool_calls")
    if choice in (None, "auto", "required", "none"):
        if choice in ("auto", "required") and not tools:
            raise InvalidParameter(f"tool_choice {choice!r} needs tools", param="tool_choice")
        if not tools or choice == "none":
            return None
        return ToolChoice(tools, choice or "auto", None, parallel)
    named = _named(choice)
    if named not in {tool.name for tool in tools}:
        raise InvalidParameter(f"tool_choice names {named!r}, which is not one of tools", param="tool_choice")
    return ToolChoice(tools, "named", named, parallel=False)  # one call of that function, as OpenAI makes


def _tools(value: Any) -> tuple[Tool, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise InvalidParameter(f"tools must be a list of at most {MAX_TOOLS} tools", param="tools")
    tools = tuple(_tool(item, index) for index, item in enumerate(value))
    if len({tool.name for tool in tools}) < len(tools):
        raise InvalidParameter("tools must have distinct function names", param="tools")
    return tools


def _tool(item: Any, index: int) -> Tool:
    param = f"tools[{index}]"
    if not isinstance(item, dict) or item.get("type") != "function" or not isinstance(item.get("function"), dict):
        raise InvalidParameter(f'{param} must be {{"type": "function", "function": {{...}}}}', param=param)
    function = item["function"]
    name, description = function.get("name"), function.get("description", "")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidParameter(f"{param}.function.name must be 1-64 letters, digits, _ or -", param=param)
    if not isinstance(description, str):
        raise InvalidParameter(f"{param}.function.description must be a string", param=param)
    if not isinstance(parameters, dict):
        raise InvalidParameter(f"{param}.function.parameters must be a JSON Schema object", param=param)
    lark_grammar(f"start: %json {_schema_json(parameters)}", f"{param}.function.parameters")
    return Tool(name, description, parameters)


def _named(choice: Any) -> str:
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidParameter(
            'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    return name


def _call_head(name: str) -> str:
    return '{"name": ' + json.dumps(name) + ', "arguments": '


def _literal(text: str) -> str:
    return json.dumps(text)  # a Lark string literal is a JSON string


def _schema_json(schema: dict[str, Any]) -> str:
    return json.dumps({**bounded(schema), "x-guidance": JSON_OPTIONS})


def call_text(name: str, arguments: str) -> str:
    """A call as the model writes it (``arguments``: the JSON text it wrote)."""
    return CALL_START + _call_head(name) + arguments + "}" + CALL_END


def prompt_messages(messages: list[dict[str, Any]], choice: ToolChoice | None) -> list[dict[str, Any]]:
    """The messages as a template without tools renders them: the tools in the system message, calls
    in the assistant's text, results in user messages (consecutive ones together)."""
    rendered: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] == "tool":
            response = f"<tool_response>\n{message['content']}\n</tool_response>"
            if rendered and rendered[-1].get("tool_results"):
                rendered[-1]["content"] += "\n" + response
            else:
                rendered.append({"role": "user", "content": response, "tool_results": True})
            continue
        calls = message.get("tool_calls") or []
        text = CALL_SEPARATOR.join(call_text(call["name"], call["arguments"]) for call in calls)
        rendered.append({"role": message["role"], "content": message["content"] + text})
    if choice is not None:
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {**rendered[0], "content": rendered[0]["content"] + "\n\n" + choice.system_text()}
        else:
            rendered.insert(0, {"role": "system", "content": choice.system_text()})
    return [{"role": m["role"], "content": m["content"]} for m in rendered]


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallOpened:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class Arguments:
    index: int
    text: str


class ToolCallParser:
    """Splits an answer written under a ``ToolChoice``'s grammar, as it streams, into text and calls."""

    def __init__(self) -> None:
        self._pending = ""
        self._mode: str | None = None  # "text", "head" (a call's opening), "arguments" or "between"
        self.calls = 0

    def push(self, text: str) -> Iterator[Content | CallOpened | Arguments]:
        """The events ``text`` completes; text that may still be a call's syntax is held back."""
        self._pending += text
        while self._pending:
            if self._mode is None:
                self._mode = "head" if self._pending.startswith("<") else "text"
            if self._mode == "text":
                yield Content(self._pending)
                self._pending = ""
            elif self._mode in ("head", "between"):
                if not (yield from self._head()):
                    return
            elif not (yield from self._arguments()):
                return

    def _head(self) -> Iterator[CallOpened]:
        skip = len(CALL_SEPARATOR) if self._mode == "between" else 0
        match = re.match(r'<tool_call>\n\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ', self._pending[skip:])
        if match is None:
            return False
        yield CallOpened(self.calls, "call_" + secrets.token_urlsafe(18), json.loads(match.group(1)))
        self._pending = self._pending[skip + match.end() :]
        self._mode = "arguments"
        return True

    def _arguments(self) -> Iterator[Arguments]:
        end = "}" + CALL_END  # a raw newline ends the arguments: compact JSON holds none
        at = self._pending.find(end)
        if at < 0:
            ready = len(self._pending) - len(end) + 1  # keep what may be the start of the end
            if ready > 0:
                yield Arguments(self.calls, self._pending[:ready])
                self._pending = self._pending[ready:]
            return False
        if at:
            yield Arguments(self.calls, self._pending[:at])
        self._pending = self._pending[at + len(end) :]
        self.calls += 1
        self._mode = "between"
        return True


def chat_prompt(card: ModelCard, messages: list[dict[str, Any]], tools: ToolChoice | None) -> str:
    """A chat's prompt in the model's own format; tools, calls and their results in the template's
    way if it takes tools, else in the documented one (``prompt_messages``)."""
    template = compiled(card.chat_template)
    if template.takes_tools:
        offered = [tool.to_json() for tool in tools.tools] if tools else None
        return template.render(messages, card.chat, tools=offered)
    return template.render(prompt_messages(messages, tools), card.chat)
