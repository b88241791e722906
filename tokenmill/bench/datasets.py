"""Benchmark workloads, generated locally or read from a file: nothing is downloaded at run time."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenmill.errors import InvalidRequestError
from tokenmill.loader.tokenizer import Tokenizer

TOPICS = [
    "the history of the printing press", "how volcanoes form", "why the sky is blue", "the rules of chess",
    "making bread at home", "the life cycle of a star", "how vaccines work", "the water cycle",
    "learning a second language", "the invention of the telephone", "how bees make honey",
    "the causes of the seasons", "training for a marathon", "how computers store numbers",
    "the migration of birds", "the architecture of gothic cathedrals",
]


@dataclass
class BenchRequest:
    """One request of a workload: its prompt (text or token ids), prompt length and tokens to generate."""

    prompt: str | list[int]
    prompt_tokens: int
    output_tokens: int


def topic_prompts(count: int) -> list[str]:
    """Varied instruction prompts of 14-18 tokens."""
    return [f"Write a detailed explanation of {TOPICS[i % len(TOPICS)]} for a curious student." for i in range(count)]


# Quoted: evaluating np.random here would import numpy's generators into every process that reads ordinary_tokens.
def lengths(rng: "np.random.Generator", count: int, mean: int, range_ratio: float) -> list[int]:
    """count lengths uniform in [mean * (1 - r), mean * (1 + r)], at least 1."""
    low, high = max(1, round(mean * (1 - range_ratio))), max(1, round(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, count).tolist()


def ordinary_tokens(tokenizer: Tokenizer) -> np.ndarray:
    """Every token id that is not a special (control) token."""
    ordinary = np.ones(tokenizer.vocab_size, dtype=bool)
    ordinary[tokenizer.special_token_ids()] = False
    return np.flatnonzero(ordinary)  # no Python int per id: Gemma 3's 262,144 of them were 7 MiB


def random_requests(tokenizer: Tokenizer, count: int, input_len: int, output_len: int, range_ratio: float,
                    seed: int) -> list[BenchRequest]:
    """Prompts of random ordinary tokens (no special tokens), sent as token ids so their length is exact."""
    rng = np.random.default_rng(seed)
    ordinary = ordinary_tokens(tokenizer)
    return [
        BenchRequest(rng.choice(ordinary, n_in).tolist(), n_in, n_out)
        for n_in, n_out in zip(lengths(rng, count, input_len, range_ratio), lengths(rng, count, output_len, range_ratio))
    ]


def prompt_requests(tokenizer: Tokenizer, count: int, output_len: int, range_ratio: float,
                    seed: int) -> list[BenchRequest]:
    """Short natural-language instructions, the shape of a chat workload."""
    rng = np.random.default_rng(seed)
    return [
        BenchRequest(text, len(tokenizer.encode(text)), n_out)
        for text, n_out in zip(topic_prompts(count), lengths(rng, count, output_len, range_ratio))
    ]


def file_requests(tokenizer: Tokenizer, path: Path, count: int, output_len: int) -> list[BenchRequest]:
    """JSON lines of {"prompt": text, "output_len": n (optional)}, cycled to count requests."""
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, or not JSON
        raise InvalidRequestError(f"cannot read dataset {path}: {exc}") from exc
    if not rows or not all(isinstance(r, dict) and isinstance(r.get("prompt"), str) for r in rows):
        raise InvalidRequestError(f"dataset {path} must hold JSON lines with a string 'prompt'")
    # 3.0 is an integer too: pandas writes a column with gaps as floats.
    lengths = [r.get("output_len", output_len) for r in rows]
    if not all(type(n) in (int, float) and n >= 1 and float(n).is_integer() for n in lengths):
        raise InvalidRequestError(f"dataset {path}: each 'output_len' (default --output-len) must be an integer >= 1")
    return [
        BenchRequest(r["prompt"], len(tokenizer.encode(r["prompt"])), int(r.get("output_len", output_len)))
        for r in (rows[i % len(rows)] for i in range(count))
    ]
