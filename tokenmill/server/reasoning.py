"""A reasoning model's thinking (<think>...</think>) split from its answer, as vLLM's --reasoning-parser splits it.

Chat answers carry the thinking as `reasoning_content` beside `content` (vLLM's and llama.cpp's field). Two styles,
named as vLLM's parsers: `qwen3`, where the model opens its thinking itself (an answer without <think> is all
content), and `deepseek_r1`, whose chat template opens it in the prompt (everything before </think> is thinking).
"""

OPEN, CLOSE = "<think>", "</think>"


class ReasoningStream:
    """Splits one answer's text, fed as it streams, into thinking and content; holds back what may be a tag."""

    def __init__(self, parser: str) -> None:
        self.parser = parser
        self.state = "start"  # then "reasoning", then "content"
        self.buffer = ""
        self.thought = False  # whether the answer had a thinking part at all
        self.content_begun = False

    def feed(self, text: str) -> tuple[str, str]:
        """The (reasoning, content) text that this delta completes."""
        self.buffer += text
        reasoning = content = ""
        if self.state == "start":
            if self.buffer.startswith(OPEN):
                self.buffer, self.state = self.buffer[len(OPEN):], "reasoning"
            elif OPEN.startswith(self.buffer):
                return "", ""  # may yet be the tag
            else:
                self.state = "reasoning" if self.parser == "deepseek_r1" else "content"
            self.thought = self.state == "reasoning"
        if self.state == "reasoning":
            end = self.buffer.find(CLOSE)
            if end < 0:
                keep = _partial_tag(self.buffer)
                reasoning, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                return reasoning, ""
            reasoning, self.buffer, self.state = self.buffer[:end], self.buffer[end + len(CLOSE):], "content"
        if self.thought and not self.content_begun:  # the blank lines between thinking and answer are neither
            self.buffer = self.buffer.lstrip()
            self.content_begun = bool(self.buffer)
        content, self.buffer = self.buffer, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held back, at the answer's end: a partial tag is text after all."""
        rest, self.buffer = self.buffer, ""
        if self.state == "start":  # a prefix of <think> and no more
            self.state = "reasoning" if self.parser == "deepseek_r1" else "content"
            self.thought = self.state == "reasoning"
        return (rest, "") if self.state == "reasoning" else ("", rest)


def split_reasoning(text: str, parser: str) -> tuple[str | None, str]:
    """A whole answer's (reasoning, content); reasoning None when it has no thinking part."""
    stream = ReasoningStream(parser)
    reasoning, content = stream.feed(text)
    more_reasoning, more_content = stream.finish()
    return (reasoning + more_reasoning if stream.thought else None), content + more_content


def _partial_tag(text: str) -> int:
    """How many of text's last characters may be the start of </think>."""
    for size in range(min(len(CLOSE) - 1, len(text)), 0, -1):
        if CLOSE.startswith(text[-size:]):
            return size
    return 0
