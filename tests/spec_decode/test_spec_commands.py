"""The speculative-decoding commands: the benchmark's shipped prompts, and `eval early-exit` end to end."""

import argparse
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


class _Counters:
    num_draft_tokens = num_accepted_tokens = num_drafts = 0
    accepted_per_pos: list[int] = []

    def copy(self):
        return self


class _AnswersEndingAtOnce:
    """An LLM whose every answer is one token (EOS at once): no decode time on either side."""

    def __init__(self, **options):
        self.tokenizer = SimpleNamespace(encode_chat=lambda conversation: [1, 2, 3])
        spec = SimpleNamespace(method="ngram")
        self.engine = SimpleNamespace(source=SimpleNamespace(name="fake"), runner=SimpleNamespace(quantization="none"),
                                      drafter=SimpleNamespace(counters=_Counters()),
                                      config=SimpleNamespace(speculative_config=spec))

    def generate(self, prompts, params, use_tqdm=False):
        timing = SimpleNamespace(first_token_time=5.0, finished_time=5.0)
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[2])], metrics=timing)
                for _ in (prompts if isinstance(prompts, list) else [prompts])]


def test_bench_spec_prints_a_row_where_no_answer_had_a_decode_to_time(monkeypatch, capsys):
    import tokenmill.llm
    from tokenmill.bench import speculative

    monkeypatch.setattr(tokenmill.llm, "LLM", _AnswersEndingAtOnce)
    parser = argparse.ArgumentParser()
    speculative.add_arguments(parser)
    assert speculative.main(parser.parse_args(["--repeats", "1"])) == 0  # a ZeroDivisionError after every repeat
    assert " 0.00x" in capsys.readouterr().out
