"""The output items of recent Responses answers, by id, for a later request's `item_reference` to name.

OpenAI's clients send a reference in place of an item the server returned (the Vercel AI SDK does on every turn
after the first, its `store` being on by default). This server keeps no responses, only what of these items a
conversation needs (a message's text, a call's name and arguments; not logprobs), and only the last ones: a
reference to an older one is refused, naming it. Each process keeps its own (under --replicas, one per replica).
"""

from collections import OrderedDict

# The items kept, and the characters of text and arguments they may hold together: a few thousand turns, some
# tens of MiB at most, however long the answers.
MAX_ITEMS = 4096
MAX_CHARS = 16 * 2**20


class ResponseItems:
    """The last output items, by id, within MAX_ITEMS and MAX_CHARS; the oldest go first."""

    def __init__(self, max_items: int = MAX_ITEMS, max_chars: int = MAX_CHARS) -> None:
        self.max_items, self.max_chars = max_items, max_chars
        self._items: OrderedDict[str, tuple[dict, int]] = OrderedDict()
        self._chars = 0

    def keep(self, items: list[dict]) -> None:
        """Remember what a conversation needs of these items, forgetting the oldest beyond the limits."""
        for item in items:
            kept = _needed(item)
            chars = sum(len(value) for value in _texts(kept))
            self._items[item["id"]] = (kept, chars)  # ids are new each answer: none is kept twice
            self._chars += chars
        while len(self._items) > self.max_items or self._chars > self.max_chars:
            self._chars -= self._items.popitem(last=False)[1][1]

    def get(self, item_id: str) -> dict | None:
        """The item with this id, if it is still kept."""
        kept = self._items.get(item_id)
        return None if kept is None else kept[0]


def _needed(item: dict) -> dict:
    """What of an output item a later turn reads: a message's role and text, a call's id, name and arguments."""
    if item["type"] == "message":
        return {"type": "message", "role": item["role"],
                "content": [{"type": part["type"], "text": part["text"]} for part in item["content"]]}
    if item["type"] == "function_call":
        return {key: item[key] for key in ("type", "call_id", "name", "arguments")}
    return {"type": item["type"]}  # reasoning: not part of a later prompt


def _texts(item: dict) -> list[str]:
    return [part["text"] for part in item.get("content", [])] + [item.get("arguments", "")]
