"""The output items of recent Responses answers, by id, for a later request's `item_reference` to name.

OpenAI's clients send a reference in place of an item the server returned (the Vercel AI SDK does on every turn
after the first, its `store` being on by default). This server keeps no responses, only these items, and only the
last MAX_ITEMS: a reference to an older one is refused, naming it.
"""

from collections import OrderedDict

# About a few thousand turns of output; each item is its text (or a call's arguments), so a few MiB in all.
MAX_ITEMS = 4096


class ResponseItems:
    """The last `capacity` output items, by id; the oldest go first."""

    def __init__(self, capacity: int = MAX_ITEMS) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, dict] = OrderedDict()

    def keep(self, items: list[dict]) -> None:
        """Remember these items, forgetting the oldest beyond the capacity."""
        for item in items:
            self._items[item["id"]] = item
            self._items.move_to_end(item["id"])
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, item_id: str) -> dict | None:
        """The item with this id, if it is still kept."""
        return self._items.get(item_id)
