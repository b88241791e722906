"""Tool calls read back out of a model's text: whole, or as a stream of content and call deltas."""

import json
from dataclasses import dataclass

from tokenmill.structured.tools import CALL_CLOSE, CALL_OPEN


@dataclass
class ToolCall:
    """One function call: its name and its arguments as JSON text, as OpenAI sends them."""

    name: str
    arguments: str


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


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """The content outside tool-call blocks (None if empty) and the calls; text that does not parse stays content."""
    stream = ToolCallStream()
    events = stream.feed(text) + stream.finish()
    content = "".join(e for e in events if isinstance(e, str))
    return content or None, [e for e in events if isinstance(e, ToolCall)]


class ToolCallStream:
    """Splits streamed text into content deltas (str) and whole calls (ToolCall), holding back a possible tag."""

    def __init__(self) -> None:
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
        if self.in_block:
            # Cut off by max_tokens inside its closing tag, a block's calls may still be whole.
            inner = self.text[self.pos :]
            cut = _partial_tag(inner, CALL_CLOSE)
            self._block(inner[: len(inner) - cut], inner[len(inner) - cut :], events)
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
        self.pending, self.after_block = "", True
        self.num_calls += len(calls)
        events.extend(calls)


def _partial_tag(text: str, tag: str = CALL_OPEN) -> int:
    """How many characters at the end of text could begin the tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
