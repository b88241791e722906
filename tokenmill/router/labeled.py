"""A labeled set for `router calibrate`: prompts with reference answers, and how an answer is checked."""

import json
import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenmill.errors import InvalidRequestError

# The shipped set: 300 items written for tokenmill, easy (capitals, one-step arithmetic, colors, opposites,
# spelling) and hard (multi-step arithmetic, word problems, facts small models often miss). Numbers check
# `numeric`; words check `contains`, unless the reference is in the prompt or is one letter, where a model that
# restates the question would pass: those check `exact` (so an answer in a sentence fails them).
SHIPPED = Path(__file__).parent / "data" / "calibration.jsonl"
LEVELS = ("easy", "hard")
FIELDS = ("prompt", "answer", "check", "level")

# Thousands separated by commas ("1,234") before plain numbers, so "1,234" is one number and "3, 4" is two.
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
# Punctuation and quotes a model wraps a one-word answer in ("Paris.", "'tac'", "**W**").
_WRAPPING = " \t\n.,;:!?\"'`*()[]"


@dataclass(frozen=True)
class Item:
    """One labeled prompt: the reference answer, the checker that compares with it, and how hard it is."""

    prompt: str
    answer: str
    check: str
    level: str


def normalize(text: str) -> str:
    """Lowercase, accents dropped (so "Brasília" matches "Brasilia"), whitespace collapsed, wrapping stripped."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return " ".join(text.lower().split()).strip(_WRAPPING)


def first_number(text: str) -> float | None:
    """The first number written in digits in the text, None if there is none."""
    match = _NUMBER.search(text)
    return float(match.group().replace(",", "")) if match else None


def check_exact(answer: str, reference: str) -> bool:
    """The answer is the reference, once both are normalized."""
    return normalize(answer) == normalize(reference)


def check_contains(answer: str, reference: str) -> bool:
    """The reference appears in the answer as whole words, case-insensitive (so "hot" is not found in "shot")."""
    return re.search(rf"(?<!\w){re.escape(normalize(reference))}(?!\w)", normalize(answer)) is not None


def check_numeric(answer: str, reference: str) -> bool:
    """The answer's first number equals the reference within 1e-6 relative."""
    value = first_number(answer)
    return value is not None and math.isclose(value, float(reference), rel_tol=1e-6)


CHECKS: dict[str, Callable[[str, str], bool]] = {
    "exact": check_exact, "contains": check_contains, "numeric": check_numeric,
}


def is_correct(item: Item, answer: str) -> bool:
    """Whether a model's answer to the item is right, by the item's checker."""
    return CHECKS[item.check](answer, item.answer)


def load_items(path: Path) -> list[Item]:
    """Items from a JSON Lines file, one object per line (blank lines skipped); a bad line names its number."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read the labeled set {path}: {exc}") from exc
    items = [_item(line, f"{path}:{number}") for number, line in enumerate(lines, 1) if line.strip()]
    if not items:
        raise InvalidRequestError(f"the labeled set {path} has no items; give one JSON object per line with "
                                  f"{', '.join(FIELDS)}")
    return items


def _item(line: str, where: str) -> Item:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{where}: not valid JSON ({exc.msg})") from exc
    except RecursionError as exc:
        raise InvalidRequestError(f"{where}: not valid JSON (nested deeper than this reader's stack)") from exc
    if not isinstance(record, dict):
        raise InvalidRequestError(f"{where}: expected a JSON object with {', '.join(FIELDS)}")
    missing = [name for name in FIELDS if name not in record]
    unknown = sorted(set(record) - set(FIELDS))
    if missing or unknown:
        raise InvalidRequestError(f"{where}: missing {missing}, unknown {unknown}; each line has exactly "
                                  f"{', '.join(FIELDS)}")
    for name in ("prompt", "answer"):
        if not isinstance(record[name], str) or not record[name].strip():
            raise InvalidRequestError(f"{where}: {name} must be a non-empty string")
    if not isinstance(record["check"], str) or record["check"] not in CHECKS:  # a list is unhashable
        raise InvalidRequestError(f"{where}: check {record['check']!r} is not one of {', '.join(CHECKS)}")
    if not isinstance(record["level"], str) or record["level"] not in LEVELS:
        raise InvalidRequestError(f"{where}: level {record['level']!r} is not one of {', '.join(LEVELS)}")
    if record["check"] == "numeric" and _float(record["answer"]) is None:
        raise InvalidRequestError(f"{where}: a numeric answer must be a number, not {record['answer']!r}")
    return Item(record["prompt"], record["answer"], record["check"], record["level"])


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
