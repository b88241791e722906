"""The benchmark runners' per-token clocks, from which `bench compare` takes single-stream decode speed."""

from pathlib import Path

import pytest

from tokenmill.bench.peers import TokenmillRunner, TransformersRunner, decode_speed

PROMPT = [1, 504, 3458, 314, 260, 1345, 282]


class StubRunner:
    """Tokens at fixed times: 0, 1, 2 and 4 s."""

    def token_times(self, prompt: list[int], n: int) -> list[float]:
        return [0.0, 1.0, 2.0, 4.0][:n]


def test_decode_speed_counts_the_tokens_after_the_first_over_their_span():
    # 3 tokens after the first in 4 s; the first token's time (the prompt's prefill) is left out.
    assert decode_speed(StubRunner(), PROMPT, 4) == pytest.approx(0.75)


def test_tokenmill_runner_times_each_new_token(smollm2_path: Path, one_thread: int):
    runner = TokenmillRunner(model=str(smollm2_path), num_threads=one_thread, enable_prefix_caching=False)
    times = runner.token_times(PROMPT, 6)
    assert len(times) == 6 and times == sorted(times) and times[-1] > times[0]


def test_transformers_streamer_clock_leaves_out_the_prompt(hf_smollm2):
    runner = object.__new__(TransformersRunner)  # the session's transformers model, not a second load
    runner.model = hf_smollm2
    times = runner.token_times(PROMPT, 3)
    assert len(times) == 3 and times == sorted(times)
