"""`tokenmill bench compare`: the same workloads on tokenmill and a peer, alternating, with ratios."""

import argparse
import platform
import statistics
from collections.abc import Callable

import numpy as np
import torch

from tokenmill.bench.datasets import ordinary_tokens, topic_prompts
from tokenmill.bench.peers import (
    LlamaCppRunner, Runner, TokenmillRunner, TransformersRunner, decode_speed, prefill_speed,
)
from tokenmill.config import EngineConfig
from tokenmill.errors import InvalidRequestError
from tokenmill.loader.tokenizer import Tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bench compare` flags."""
    parser.add_argument("--model", default=EngineConfig.model, help="a catalog name or a .gguf file")
    parser.add_argument("--peer", choices=["transformers", "llama.cpp"], default="transformers")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="batch sizes to run")
    parser.add_argument("--output-len", type=int, default=128, help="new tokens per request")
    parser.add_argument("--prefill-len", type=int, default=512, help="prompt tokens for the prefill figure")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for both")


def main(args: argparse.Namespace) -> int:
    """Measure and print a markdown table."""
    from tokenmill.loader.source import open_model

    torch.set_num_threads(args.threads)
    source = open_model(args.model)
    if source.path.suffix != ".gguf":
        raise InvalidRequestError("bench compare loads the same GGUF file in both engines; give a .gguf model")
    ours = TokenmillRunner(args.model, num_threads=args.threads)
    peer = TransformersRunner(source.path) if args.peer == "transformers" else LlamaCppRunner(source.path, args.threads)
    prompts, long_prompt = _prompts(ours.llm.tokenizer, args)
    for runner in (ours, peer):  # warm-up: first-call allocations and kernel selection
        runner.generate(prompts[:1], 4)
    samples: dict[str, dict[str, list[float]]] = {ours.name: {}, peer.name: {}}
    for _ in range(args.rounds):  # alternate, so machine noise hits both alike
        for runner in (ours, peer):
            for label, measure in _measures(runner, prompts, long_prompt, args):
                samples[runner.name].setdefault(label, []).append(measure())
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
          f"model {source.name}; peer {peer.name}; median of {args.rounds} rounds")
    print(f"| workload | tokenmill | {peer.name} | tokenmill / {peer.name} |")
    print("|---|---|---|---|")
    for label in samples[ours.name]:
        a, b = statistics.median(samples[ours.name][label]), statistics.median(samples[peer.name][label])
        print(f"| {label} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    return 0


def _prompts(tokenizer: Tokenizer, args: argparse.Namespace) -> tuple[list[list[int]], list[int]]:
    """Instruction prompts, one per concurrent request, and one long random prompt for prefill."""
    prompts = [tokenizer.encode(t) for t in topic_prompts(max(args.concurrency))]
    long_prompt = np.random.default_rng(0).choice(ordinary_tokens(tokenizer), args.prefill_len).tolist()
    return prompts, long_prompt


def _measures(runner: Runner, prompts: list[list[int]], long_prompt: list[int],
              args: argparse.Namespace) -> list[tuple[str, Callable[[], float]]]:
    n = args.output_len

    def batch(c: int) -> Callable[[], float]:
        return lambda: c * n / runner.generate(prompts[:c], n)

    return [
        ("single-stream decode, tokens/s", lambda: decode_speed(runner, prompts[0], n)),
        (f"prefill of {args.prefill_len} tokens, tokens/s", lambda: prefill_speed(runner, long_prompt)),
        *((f"{c} concurrent x {n} tokens, output tokens/s", batch(c)) for c in args.concurrency),
    ]
