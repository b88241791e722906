"""`tokenmill bench gpu`: decode step time against the memory bound, CUDA graphs on and off, offline throughput
against transformers' generate, on a random-weight Llama-shaped model (the figures issue 25 asks for)."""

import argparse
import random
import tempfile
from pathlib import Path

# Llama 3.2 1B's shape (1.24B parameters, tied embeddings); `tiny` lets the command run anywhere in seconds.
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench gpu flags."""
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=64, help="decode steps timed at batch 1")


def main(args: argparse.Namespace) -> int:
    """Print each figure, and the ratio each acceptance point is about."""
    import torch  # here, not at the top: `tokenmill --help` must not pay for it

    from tokenmill import LLM
    from tokenmill.bench.gpu_measure import (copy_bandwidth, decode_step_seconds, device_name, offline_tokens_per_second,
                                             release, save_random_llama, transformers_tokens_per_second)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        reference = save_random_llama(Path(tmp), SHAPES[args.shape], dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
        bandwidth = copy_bandwidth(device)
        bound = weight_bytes / bandwidth
        print(f"model: {args.shape} Llama, {weight_bytes / 1e9:.2f} GB of {args.dtype} weights; device {device_name(device)}")
        print(f"device-to-device copy: {bandwidth / 1e9:.0f} GB/s, so reading the weights once takes {bound * 1e3:.3f} ms")
        steps = {}
        for eager in (False, True):
            llm = LLM(tmp, device=args.device, dtype=args.dtype, quantization="none", enforce_eager=eager)
            steps[eager] = decode_step_seconds(llm, args.decode_steps)
            label = "eager" if eager else "CUDA graphs" if device.type == "cuda" else "no graphs off CUDA"
            print(f"decode step at batch 1, {label}: {steps[eager] * 1e3:.3f} ms = {steps[eager] / bound:.2f}x the bound")
            del llm
            release(device)
        print(f"CUDA graphs against eager: {steps[True] / steps[False]:.2f}x faster decode steps")
        rng = random.Random(0)
        prompts = [[rng.randrange(3, SHAPES[args.shape]["vocab_size"]) for _ in range(args.input_len)]
                   for _ in range(args.num_prompts)]
        llm = LLM(tmp, device=args.device, dtype=args.dtype, quantization="none")
        ours = offline_tokens_per_second(llm, prompts, args.output_len)
        del llm
        release(device)
        theirs = transformers_tokens_per_second(reference.to(device), prompts, args.output_len)
        print(f"offline {args.num_prompts} x ({args.input_len} in, {args.output_len} out): tokenmill {ours:.0f} "
              f"output tok/s, transformers generate {theirs:.0f} tok/s = {ours / theirs:.2f}x")
    return 0
