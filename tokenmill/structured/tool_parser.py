"""Tool calls read back out of a model's text: whole, or as a stream of content and call deltas."""

import json
import re
from dataclasses import dataclass

from tokenmill.structured.tools import CALL_CLOSE, CALL_OPEN


@dataclass
class ToolCall:
    """One function call: its name and its arguments as JSON text, as OpenAI sends them."""

    name: str
    arguments: str


@dataclass
class ArgumentsDelta:
    """More of the open call's arguments (JSON text), as they are generated."""

    text: str


class NamedCallStream:
    """The streamed text of a named tool_choice, which is the function's arguments alone: the first text opens the
    call, the rest are its arguments' deltas, sent as they come."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.num_calls = 0

    def feed(self, delta: str) -> list[ToolCall | ArgumentsDelta]:
        """Events for newly arrived text."""
        if not delta:
            return []
        if self.num_calls:
            return [ArgumentsDelta(delta)]
        self.num_calls = 1
        return [ToolCall(self.name, delta)]

    def finish(self) -> list[ToolCall | ArgumentsDelta]:
        """The call, with no arguments, where no text came at all: the whole answer is a call all the same."""
        if self.num_calls:
            return []
        self.num_calls = 1
        return [ToolCall(self.name, "")]


def parse_block(inner: str) -> list[ToolCall] | None:
    """The calls in one <tool_call> block (a JSON list, or one object as Hermes writes it); None if it is not that."""
    try:
        value = json.loads(inner)
    except (ValueError, RecursionError):  # not JSON, an integer past 4,300 digits, nesting past Python's stack
        return None
    calls = []
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        # Llama 3.1's templates write "parameters" where OpenAI and Hermes write "arguments".
        arguments = item.get("arguments", item.get("parameters", {}))
        calls.append(ToolCall(item["name"], arguments if isinstance(arguments, str) else json.dumps(arguments)))
    return calls


def partial_calls(inner: str, names: tuple[str, ...]) -> list[ToolCall]:
    """The calls of a forced block cut off before it closed: the whole ones, then the one cut short with its
    arguments as far as they got; its name as written, or the one of `names` (the functions the call may name)
    that the name cut short begins."""
    calls: list[ToolCall] = []
    decoder = json.JSONDecoder()
    pos = inner.find("[") + 1  # the forced grammar's list: `[{"name": ..., "arguments": ...}, ...`
    while True:
        pos = len(inner) - len(inner[pos:].lstrip(", \n"))
        try:
            item, pos = decoder.raw_decode(inner, pos)
        except (ValueError, RecursionError):
            break
        calls += parse_block(json.dumps(item)) or []
    rest = inner[pos:]
    # Written as the grammar writes it (JSON_STYLE): {"name": "...", "arguments": ...
    begun = re.match(r'\{"name": ("(?:[^"\\]|\\.)*")(, "arguments": (.*))?', rest, re.S)
    if begun:
        return calls + [ToolCall(json.loads(begun[1]), begun[3] or "")]
    if calls and not rest.strip():  # cut between calls
        return calls
    started = re.match(r'\{"name": "((?:[^"\\]|\\.)*)', rest)
    fits = [name for name in names if name.startswith(started[1] if started else "")]
    return calls + [ToolCall(fits[0], "")] if len(fits) == 1 else calls


def arguments_object(arguments: str) -> dict:
    """A call's arguments (JSON text) as the object Anthropic's and Ollama's calls hold; a call max_tokens cut short
    has none."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def parse_tool_calls(text: str, names: tuple[str, ...] = ()) -> tuple[str | None, list[ToolCall]]:
    """The content outside tool-call blocks (None if empty) and the calls; text that does not parse stays content.
    names: the functions a forced call may name (required: any of the tools); text cut short is then a
    call cut short."""
    stream = ToolCallStream(names)
    events = stream.feed(text) + stream.finish()
    content = "".join(e for e in events if isinstance(e, str))
    return content or None, [e for e in events if isinstance(e, ToolCall)]


class ToolCallStream:
    """Splits streamed text into content deltas (str) and whole calls (ToolCall), holding back a possible tag.

    names: the functions a forced call may name (required: any of the tools); a block cut off by
    max_tokens is then the calls cut short, as OpenAI and vLLM answer them, not the template's tags as content.
    """

    def __init__(self, names: tuple[str, ...] = ()) -> None:
        self.names = names
        self.text = ""
        self.pos = 0  # text before this is handled
        self.in_block = False
        # Whitespace touching a block is no content: trailing whitespace waits until content follows it (or the
        # text ends after content), so streamed and whole text give the same content.
        self.pending = ""
        self.after_block = False
        self.num_calls = 0

    def feed(self, delta: str) -> list[str | ToolCall]:
        """Events for newly arrived text."""
        self.text += delta
        events: list[str | ToolCall] = []
        while True:
            if self.in_block:
                end = self.text.find(CALL_CLOSE, self.pos)
                if end < 0:
                    return events
                self._block(self.text[self.pos : end], CALL_CLOSE, events)
                self.pos, self.in_block = end + len(CALL_CLOSE), False
                continue
            start = self.text.find(CALL_OPEN, self.pos)
            if start < 0:
                safe = len(self.text) - _partial_tag(self.text)
                self._content(self.text[self.pos : safe], events)
                self.pos = max(self.pos, safe)
                return events
            self._content(self.text[self.pos : start], events)
            self.pos, self.in_block = start + len(CALL_OPEN), True

    def finish(self) -> list[str | ToolCall]:
        """Events for what is still held back once the text is complete (a block the model never closed is tried)."""
        events: list[str | ToolCall] = []
        rest = self.text[self.pos :]
        if self.names and not self.in_block and rest.strip() and CALL_OPEN.startswith(rest.strip()):
            self.in_block, rest = True, ""  # the grammar's opening tag, cut short: a call begun
        if self.in_block:
            # Cut off by max_tokens inside its closing tag, a block's calls may still be whole.
            cut = _partial_tag(rest, CALL_CLOSE)
            inner, close = rest[: len(rest) - cut], rest[len(rest) - cut :]
            if self.names and parse_block(inner) is None:
                self._calls(partial_calls(inner, self.names), events)
            else:
                self._block(inner, close, events)
        else:
            self._content(self.text[self.pos :], events)
            if self.pending and not self.after_block:
                events.append(self.pending)
        self.pos, self.in_block, self.pending = len(self.text), False, ""
        return events

    def _content(self, text: str, events: list[str | ToolCall]) -> None:
        self.pending += text
        body = self.pending.rstrip()
        if body:
            events.append(body)
            self.pending, self.after_block = self.pending[len(body) :], False

    def _block(self, inner: str, close: str, events: list[str | ToolCall]) -> None:
        calls = parse_block(inner)
        if calls is None:  # not a call after all: the tags and their text are content
            self._content(CALL_OPEN + inner + close, events)
            return
        self._calls(calls, events)

    def _calls(self, calls: list[ToolCall], events: list[str | ToolCall]) -> None:
        self.pending, self.after_block = "", True
        self.num_calls += len(calls)
        events.extend(calls)


def _partial_tag(text: str, tag: str = CALL_OPEN) -> int:
    """How many characters at the end of text could begin the tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
