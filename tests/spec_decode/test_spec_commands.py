"""The speculative-decoding commands: the benchmark's shipped prompts, and `eval early-exit` end to end."""

import subprocess
import sys
from pathlib import Path

from tokenmill.bench.speculative import load_prompts

SAMPLE = Path(__file__).parents[1] / "data" / "sample.txt"


def test_the_benchmark_set_has_grounded_prompts_with_their_texts_and_open_ones():
    items = load_prompts()
    grounded = [i for i in items if i["kind"] == "grounded"]
    assert len(grounded) >= 8 and len([i for i in items if i["kind"] == "open"]) >= 8
    # Each grounded prompt carries the text it reworks, which is the predicted output.
    assert all(i["prediction"] and i["prediction"][:40] in i["prompt"] for i in grounded)


def test_eval_early_exit_prints_acceptance_by_position_and_speed(smollm2_path):
    result = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "eval", "early-exit", "--model", str(smollm2_path), "--file",
         str(SAMPLE), "--layers", "20", "--prompts", "1", "--max-tokens", "8", "--num-speculative-tokens", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    row = result.stdout.strip().splitlines()[-1].split()
    # layer, overall acceptance, one figure per draft position, tokens/s, ratio to no speculation
    assert row[0] == "20" and row[1].endswith("%") and len(row) == 6 and row[-1].endswith("x")
