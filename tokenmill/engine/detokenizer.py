"""Incremental detokenization with stop strings that never leak, even partially, into a stream."""

from itertools import islice

from tokenmill.loader.tokenizer import Tokenizer

# Prompt tokens decoded ahead of the output so the first output token keeps its leading space.
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text as they arrive and finds stop strings."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], stop: list[str], include_stop: bool,
                 skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop = include_stop
        # False (vLLM's skip_special_tokens=false): control tokens the model writes show as their text.
        self.skip_special = skip_special
        # Text may end in the first characters of a stop string; hold those back from streams.
        self.holdback = max((len(s) for s in stop), default=1) - 1
        # Control tokens decode to nothing, and a window starting past one would strip the next word's space as
        # SentencePiece strips the text's first: they are left out of the ids decoded.
        context = (t for t in reversed(prompt_token_ids) if not tokenizer.is_special(t))
        self.ids = list(islice(context, _PROMPT_CONTEXT_TOKENS))[::-1]
        # A window starting or ending partway through a character (byte-fallback pieces): those bytes are no
        # context to slice the output's text after. Decoders spell a whole run of bytes that are not UTF-8 as
        # U+FFFD, so the start goes first: else a window starting mid-character would empty from its end.
        while self.ids and tokenizer.decode(self.ids).startswith("\ufffd"):
            self.ids.pop(0)
        while self.ids and tokenizer.decode(self.ids).endswith("\ufffd"):
            self.ids.pop()
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.finished = False

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append a token; return the stop string if the text now contains one and check_stop is set."""
        if self.skip_special and self.tokenizer.is_special(token_id):
            return None
        self.ids.append(token_id)
        new = self._new_text()
        if new.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its remaining bytes
            return None
        self.prefix_offset = self.read_offset
        if not check_stop:
            self.text += new
            self.read_offset = len(self.ids)
            return None
        return self._append(new)

    def finish(self, decode_rest: bool = True, check_stop: bool = True) -> str | None:
        """Mark the text complete so nothing is held back any more; decode_rest: a partial character's bytes too.

        Returns the stop string that text completes, where it was cut (when check_stop is set).
        """
        found = None
        if decode_rest and not self.finished and self.read_offset < len(self.ids):
            # The output ended partway through a character: its bytes show as decoding the whole output shows them,
            # short of any stop string they complete.
            rest = self._new_text()
            if check_stop:
                found = self._append(rest)
            else:
                self.text += rest
                self.read_offset = len(self.ids)
        self.finished = True
        return found

    def _append(self, new: str) -> str | None:
        """Add new text (all ids read); cut it at the first stop string in it, which is returned."""
        # A stop string must end in the new text; as in vLLM it may begin before it, even in text made before
        # min_tokens let checking begin.
        before = len(self.text)
        self.text += new
        self.read_offset = len(self.ids)
        # The stop that completes first, ties in the list's order: as text streamed a character at a time would
        # meet them, whatever the tokens (the earliest start made stops ["bc", "abcd"] cut "abcd" differently when
        # it came as one token or as "a", "bc", "d").
        found = [(at + len(stop), i, at) for i, stop in enumerate(self.stop)
                 if (at := self.text.find(stop, max(0, before - len(stop) + 1))) != -1]
        if not found:
            return None
        _, i, at = min(found)
        stop = self.stop[i]
        self.text = self.text[: at + len(stop)] if self.include_stop else self.text[:at]
        self.finished = True
        return stop

    def _new_text(self) -> str:
        """Text of the tokens after read_offset, decoded after those from prefix_offset so spaces come out right."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special)
        whole = self.tokenizer.decode(self.ids[self.prefix_offset :], self.skip_special)
        # Byte-fallback decoders spell a whole run of bytes that is not UTF-8 as one U+FFFD a byte, the prefix's
        # valid characters too: then slicing by the prefix's length miscounts, and the new tokens go alone.
        if not whole.startswith(prefix):
            return self.tokenizer.decode(self.ids[self.read_offset :], self.skip_special)
        return whole[len(prefix) :]

    @property
    def stream_text(self) -> str:
        """Text that is safe to show now: final once finished, else minus a possible partial stop."""
        if self.finished or not self.holdback:
            return self.text
        return self.text[: max(0, len(self.text) - self.holdback)]
