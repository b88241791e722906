"""`tokenmill bench compare`: the same workloads on tokenmill and a peer, alternating, with ratios."""

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from tokenmill.bench.datasets import ordinary_tokens, topic_prompts
from tokenmill.config import DTYPE_NAMES
from tokenmill.errors import InvalidRequestError
from tokenmill.flags import add_engine_flags, engine_options
from tokenmill.loader.tokenizer import Tokenizer

if TYPE_CHECKING:  # the peers import torch, which `tokenmill --help` must not pay for
    from tokenmill.bench.peers import Runner


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bench compare` flags: the workload, the peer, and the engine flags (--model must be a .gguf)."""
    parser.add_argument("--peer", choices=["transformers", "llama.cpp"], default="transformers")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="batch sizes to run")
    parser.add_argument("--output-len", type=int, default=128, help="new tokens per request")
    parser.add_argument("--prefill-len", type=int, default=512, help="prompt tokens for the prefill figure")
    parser.add_argument("--context-len", type=int, default=2000,
                        help="prompt tokens before the long-context decode figure (0: leave it out)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the median is reported")
    parser.add_argument("--mix", type=int, nargs=3, metavar=("SEQS", "MIN", "MAX"),
                        help="also run nano-vllm's offline mix: SEQS random prompts, input and output lengths "
                             "uniform in [MIN, MAX] (nano-vllm: 256 100 1024)")
    parser.add_argument("--peer-dtype", choices=DTYPE_NAMES,
                        help="dtype transformers loads the weights in (default: tokenmill's --dtype)")
    add_engine_flags(parser)  # --num-threads is the peer's thread count too


def main(args: argparse.Namespace) -> int:
    """Measure and print a markdown table."""
    if args.output_len < 2 or args.prefill_len < 1 or args.rounds < 1 or args.context_len < 0 or min(
            args.concurrency) < 1:
        raise InvalidRequestError("need --output-len >= 2 (decode is timed from the first token to the last), "
                                  "--prefill-len, --rounds and --concurrency >= 1, and --context-len >= 0")
    import torch

    from tokenmill import ops
    from tokenmill.bench.peers import LlamaCppRunner, TokenmillRunner, TransformersRunner
    from tokenmill.dtypes import DTYPES
    from tokenmill.env import cpu_features
    from tokenmill.loader.source import open_model

    threads = args.num_threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    source = open_model(args.model)
    if source.path.suffix != ".gguf":
        raise InvalidRequestError("bench compare loads the same GGUF file in both engines; give a .gguf model")
    # No prefix cache: the rounds repeat prompts, and a cache hit would skip the very work being timed.
    ours = TokenmillRunner(**engine_options(args, num_threads=threads, enable_prefix_caching=False))
    context = args.context_len + args.output_len
    if args.context_len and context > ours.llm.engine.max_model_len:
        raise InvalidRequestError(
            f"--context-len {args.context_len} and --output-len {args.output_len} need {context} tokens of context; "
            f"this engine's is {ours.llm.engine.max_model_len}: give a smaller --context-len (0 leaves it out)"
        )
    peer_dtype = args.peer_dtype or args.dtype
    peer = (TransformersRunner(source.path, DTYPES[peer_dtype]) if args.peer == "transformers"
            else LlamaCppRunner(source.path, threads, n_ctx=max(4096, context)))
    peer_desc = (f"{peer.name} {peer_dtype}" if args.peer == "transformers"
                 else f"{peer.name}, serving concurrent prompts one after another")
    workload = _workload(ours.llm.tokenizer, args)
    for runner in (ours, peer):  # warm-up: first-call allocations and kernel selection at the largest shapes
        runner.generate(workload.prompts, 4)
        runner.generate([workload.long_prompt, *([workload.context] if workload.context else [])], 1)
    samples: dict[str, dict[str, list[float]]] = {ours.name: {}, peer.name: {}}
    for _ in range(args.rounds):  # alternate, so machine noise hits both alike
        for runner in (ours, peer):
            for label, measure in _measures(runner, workload, args):
                samples[runner.name].setdefault(label, []).append(measure())
    # The CPU by name and the kernel that ran: these ratios differ by CPU family (docs/benchmarks.md).
    print(f"machine: {cpu_features()[0]}, {ops.quantized_matmul_kernel() or 'no int8/int4'} kernel, {threads} threads, "
          f"torch {torch.__version__}; "
          f"model {source.name}, tokenmill {args.dtype} quantization {ours.llm.engine.runner.quantization}; peer {peer_desc}; "
          f"median of {args.rounds} rounds")
    print(f"| workload | tokenmill | {peer.name} | tokenmill / {peer.name} |")
    print("|---|---|---|---|")
    for label in samples[ours.name]:
        a, b = statistics.median(samples[ours.name][label]), statistics.median(samples[peer.name][label])
        print(f"| {label} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    return 0


@dataclass
class Workload:
    """Prompts shared by both engines: short instructions, a long prompt to prefill, a longer context to decode
    after, and the optional offline mix."""

    prompts: list[list[int]]
    long_prompt: list[int]
    context: list[int] = field(default_factory=list)
    mix_prompts: list[list[int]] = field(default_factory=list)
    mix_lens: list[int] = field(default_factory=list)


def _workload(tokenizer: Tokenizer, args: argparse.Namespace) -> Workload:
    rng = np.random.default_rng(0)
    ordinary = ordinary_tokens(tokenizer)
    workload = Workload([tokenizer.encode(t) for t in topic_prompts(max(args.concurrency))],
                        rng.choice(ordinary, args.prefill_len).tolist())
    if args.mix:
        seqs, low, high = args.mix
        workload.mix_prompts = [rng.choice(ordinary, n).tolist() for n in rng.integers(low, high + 1, seqs)]
        workload.mix_lens = rng.integers(low, high + 1, seqs).tolist()
    workload.context = rng.choice(ordinary, args.context_len).tolist()  # drawn last: the other prompts stay as they were
    return workload


def _measures(runner: "Runner", workload: Workload, args: argparse.Namespace) -> list[tuple[str, Callable[[], float]]]:
    prompts, n = workload.prompts, args.output_len

    def batch(c: int) -> Callable[[], float]:
        return lambda: c * n / runner.generate(prompts[:c], n)

    mix = []
    if workload.mix_prompts:
        seqs, low, high = args.mix
        label = f"offline mix {seqs} seqs, lengths U[{low}, {high}], output tokens/s"
        total = sum(workload.mix_lens)
        mix = [(label, lambda: total / runner.generate(workload.mix_prompts, workload.mix_lens))]
    from tokenmill.bench.peers import decode_speed, prefill_speed

    # Each decode step reads the whole KV cache: after a long conversation that costs about as much as the weights.
    context = [(f"single-stream decode after {args.context_len} tokens, tokens/s",
                lambda: decode_speed(runner, workload.context, n))] if args.context_len else []
    return [
        ("single-stream decode, tokens/s", lambda: decode_speed(runner, prompts[0], n)),
        *context,
        (f"prefill of {args.prefill_len} tokens, tokens/s", lambda: prefill_speed(runner, workload.long_prompt)),
        *((f"{c} concurrent x {n} tokens, output tokens/s", batch(c)) for c in args.concurrency),
        *mix,
    ]
