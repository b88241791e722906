"""`router calibrate`: the answer checkers, the labeled-set loader, the quality-cost curve, and one real run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmill.errors import InvalidRequestError
from tokenmill.router import curve
from tokenmill.router.calibrate import FEW_SHOT, _verdict
from tokenmill.router.curve import Answer, Record
from tokenmill.router.labeled import SHIPPED, Item, check_contains, check_exact, check_numeric, load_items


@pytest.mark.parametrize("answer, reference, right", [
    ("Paris.", "Paris", True),
    ("  'TAC' ", "tac", True),
    ("Brasília", "Brasilia", True),
    ("The capital is Paris", "Paris", False),  # exact means the answer is the reference, not contains it
    ("Lyon", "Paris", False),
])
def test_exact_compares_normalized_strings(answer, reference, right):
    assert check_exact(answer, reference) is right


@pytest.mark.parametrize("answer, reference, right", [
    ("The capital of France is PARIS.", "Paris", True),
    ("It is Mexico City, of course", "Mexico City", True),
    ("Gabriel García Márquez", "Marquez", True),
    ("The opposite of hot is warm", "cold", False),
    ("a long shot", "hot", False),  # a word inside another word is not the answer
])
def test_contains_finds_the_reference_as_whole_words(answer, reference, right):
    assert check_contains(answer, reference) is right


@pytest.mark.parametrize("answer, reference, right", [
    ("42", "42", True),
    ("The answer is 4,743 apples.", "4743", True),
    ("-7 degrees", "-7", True),
    ("2.5000001", "2.5", True),  # within 1e-6 relative
    ("2.51", "2.5", False),
    ("17 + 25 = 42", "42", False),  # the first number counts, not any number
    ("forty-two", "42", False),  # digits only
])
def test_numeric_compares_the_first_number(answer, reference, right):
    assert check_numeric(answer, reference) is right


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = '{"prompt": "What is 2 + 2?", "answer": "4", "check": "numeric", "level": "easy"}'


def test_loader_reads_items_and_skips_blank_lines(tmp_path):
    items = load_items(_write(tmp_path, [GOOD, "", GOOD.replace("2 + 2", "3 + 3").replace('"4"', '"6"')]))
    assert items == [Item("What is 2 + 2?", "4", "numeric", "easy"), Item("What is 3 + 3?", "6", "numeric", "easy")]


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),  # a RecursionError traceback
    ('["a list"]', "expected a JSON object"),
    ('{"prompt": "q", "answer": "a", "check": "exact"}', "missing ['level']"),
    ('{"prompt": "q", "answer": "a", "check": "exact", "level": "easy", "hint": 1}', "unknown ['hint']"),
    ('{"prompt": "", "answer": "a", "check": "exact", "level": "easy"}', "prompt must be a non-empty string"),
    ('{"prompt": "q", "answer": "a", "check": "regex", "level": "easy"}', "check 'regex' is not one of"),
    ('{"prompt": "q", "answer": "a", "check": "exact", "level": "medium"}', "level 'medium' is not one of"),
    # A list is unhashable: a TypeError traceback.
    ('{"prompt": "q", "answer": "a", "check": ["exact"], "level": "easy"}', "check ['exact'] is not one of"),
    ('{"prompt": "q", "answer": "a", "check": "exact", "level": {}}', "level {} is not one of"),
    ('{"prompt": "q", "answer": "four", "check": "numeric", "level": "easy"}', "numeric answer must be a number"),
])
def test_loader_names_the_bad_line_and_what_is_wrong(tmp_path, bad, message):
    path = _write(tmp_path, [GOOD, "", bad])
    with pytest.raises(InvalidRequestError) as error:
        load_items(path)
    assert f"{path}:3: " in str(error.value) and message in str(error.value)


def test_loader_rejects_an_empty_set(tmp_path):
    with pytest.raises(InvalidRequestError, match="has no items"):
        load_items(_write(tmp_path, ["", "  "]))


def test_shipped_set_loads_with_both_levels_every_check_and_no_few_shot_question():
    items = load_items(SHIPPED)
    assert 250 <= len(items) <= 400
    assert {i.level for i in items} == {"easy", "hard"} and {i.check for i in items} == {"exact", "contains", "numeric"}
    assert len({i.prompt for i in items}) == len(items)
    prompts = {i.prompt for i in items}
    assert not [q for q, _ in FEW_SHOT if q in prompts]  # the worked examples must not give an answer away


def _records() -> list[Record]:
    """Four items; model 0 is cheap (1 USD) and right on the confident two, model 1 costs 10 and is right on three."""
    def item(level: str) -> Item:
        return Item("q", "a", "exact", level)

    def cheap(correct: bool, confidence: float) -> Answer:
        return Answer("", correct, confidence, 1.0)

    def strong(correct: bool) -> Answer:
        return Answer("", correct, -0.1, 10.0)

    return [Record(item("easy"), [cheap(True, -0.2), strong(True)]),
            Record(item("easy"), [cheap(True, -0.5), strong(False)]),
            Record(item("hard"), [cheap(False, -1.0), strong(True)]),
            Record(item("hard"), [cheap(False, -2.0), strong(True)])]


def test_single_models_and_cheapest_score_their_own_answers():
    records = _records()
    cheap, strong = curve.single(records, 0, "cheap"), curve.single(records, 1, "strong")
    assert (cheap.quality, cheap.cost_usd, cheap.by_level) == (0.5, 1.0, {"easy": 1.0, "hard": 0.0})
    assert (strong.quality, strong.cost_usd, strong.by_level) == (0.75, 10.0, {"easy": 0.5, "hard": 1.0})
    first = curve.cheapest(records)
    assert (first.policy, first.quality, first.cost_usd) == ("cheapest", cheap.quality, cheap.cost_usd)


def test_cascade_never_escalating_is_the_cheap_model():
    point = curve.cascade(_records(), -math.inf)
    assert (point.quality, point.cost_usd, point.escalated) == (0.5, 1.0, 0.0)


def test_cascade_always_escalating_pays_both_and_gets_the_strong_quality():
    point = curve.cascade(_records(), math.inf)
    assert (point.quality, point.cost_usd, point.escalated) == (0.75, 11.0, 1.0)


def test_cascade_between_keeps_confident_answers_and_counts_both_runs_of_escalated_ones():
    # -0.75: items 1 and 2 keep the cheap answer (right, 1 USD each); 3 and 4 escalate (right, 11 USD each).
    point = curve.cascade(_records(), -0.75)
    assert (point.quality, point.cost_usd, point.escalated) == (1.0, 6.0, 0.5)
    # A threshold equal to a confidence keeps that answer, as the server does (>=).
    assert curve.cascade(_records(), -1.0).escalated == 0.25


def test_sweep_gives_every_distinct_cascade_once_with_midpoints():
    thresholds = curve.sweep(_records())
    assert thresholds == [-math.inf, -1.5, -0.75, -0.35, math.inf]
    escalated = [curve.cascade(_records(), t).escalated for t in thresholds]
    assert escalated == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_best_threshold_is_the_cheapest_cascade_reaching_the_target():
    records = _records()
    points = curve.curve(records, ["cheap", "strong"])
    assert [p.policy for p in points[:3]] == ["cheap", "strong", "cheapest"]
    best = curve.best_threshold(points, 0.9)
    assert best is not None and (best.threshold, best.quality, best.cost_usd) == (-0.75, 1.0, 6.0)
    # 0.5 is reached by never escalating, the cheapest of all.
    assert curve.best_threshold(points, 0.5).threshold == -math.inf
    assert curve.best_threshold(points, 1.01) is None
    assert curve.default_target(records) == pytest.approx(0.9 * 0.75)


def test_the_verdict_is_the_strong_model_alone_where_every_cascade_costs_more():
    # The cheap model is right on half the items and surest where it is wrong, at half the strong model's price.
    records = [Record(Item(f"q{i}", "a", "exact", "easy"),
                      [Answer("", i % 2 == 0, -0.5 if i % 2 == 0 else -0.1, 1.0), Answer("", True, -0.1, 2.0)])
               for i in range(10)]
    points = curve.curve(records, ["cheap", "strong"])
    best = curve.best_threshold(points, 0.9)
    assert best is not None and best.cost_usd == 3.0  # every item escalated: both runs paid
    verdict = _verdict(points, best, 0.9, curve.single(records, 1, "strong"))
    assert verdict.endswith("serve strong alone") and "1.000 at 2 USD per item" in verdict
    # Where a cascade is cheaper, the verdict is that cascade.
    points = curve.curve(_records(), ["cheap", "strong"])
    verdict = _verdict(points, curve.best_threshold(points, 0.9), 0.9, curve.single(_records(), 1, "strong"))
    assert verdict.endswith("--router cascade --cascade-threshold=-0.75")


def test_table_shows_each_policy_and_marks_the_best_row():
    points = curve.curve(_records(), ["cheap", "strong"])
    best = curve.best_threshold(points, 0.9)
    rows = curve.table(points, best).splitlines()
    assert rows[1].split()[:2] == ["cheap", "0.500"] and rows[2].split()[:2] == ["strong", "0.750"]
    marked = [row for row in rows if row.endswith("<- best")]
    assert len(marked) == 1 and marked[0].split()[:3] == ["cascade", "-0.75", "1.000"]
    assert len(rows) == 1 + 3 + len(curve.TABLE_THRESHOLDS)  # header, singles and cheapest, the grid (with -0.75)
    off_grid = next(p for p in points if p.threshold == -0.35)
    rows = curve.table(points, off_grid).splitlines()
    assert len(rows) == 1 + 3 + len(curve.TABLE_THRESHOLDS) + 1
    assert [row.split()[1] for row in rows if row.endswith("<- best")] == ["-0.35"]


def test_calibrate_help_imports_neither_torch_nor_matplotlib():
    probe = ("import sys\nfrom tokenmill import cli\ntry:\n    cli.main(['router', 'calibrate', '--help'])\n"
             "except SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules, 'matplotlib' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "--target-quality" in result.stdout and result.stdout.splitlines()[-1] == "0 False False", result.stderr


def test_calibrate_needs_two_models():
    result = subprocess.run([sys.executable, "-m", "tokenmill.cli", "router", "calibrate", "--model", "smollm2-135m"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "give two or more --model values" in result.stderr


def test_calibrate_runs_both_catalog_models_and_writes_table_plot_and_json(tmp_path, smollm2_path):
    from tokenmill.loader import catalog

    catalog.pull("gemma3-270m")
    lines = load_items(SHIPPED)
    chosen = [lines[0], lines[40], lines[70], lines[120], lines[200], lines[280]]
    eval_file = tmp_path / "six.jsonl"
    eval_file.write_text("".join(json.dumps(vars(item)) + "\n" for item in chosen))
    plot, report = tmp_path / "curve.png", tmp_path / "calibration.json"
    result = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "router", "calibrate", "--model", "smollm2-135m",
         "--model", "gemma3-270m", "--eval", str(eval_file), "--max-tokens", "8", "--plot", str(plot),
         "--json", str(report)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()
    assert any(row.split()[:2] == ["policy", "threshold"] for row in rows)
    for policy in ("smollm2-135m", "gemma3-270m", "cheapest", "cascade"):
        assert any(row.startswith(policy) for row in rows), policy
    assert any(row.startswith("target quality") or row.startswith("no cascade threshold") for row in rows)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(report.read_text())
    assert data["models"] == ["smollm2-135m", "gemma3-270m"] and len(data["records"]) == 6
    for record in data["records"]:
        assert len(record["answers"]) == 2
        for answer in record["answers"]:
            assert answer["cost_usd"] > 0 and answer["confidence"] <= 0
