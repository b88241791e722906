"""`tokenmill bench offline`: engine throughput without HTTP, single-stream speeds, and memory."""

import argparse
import resource
import time

import numpy as np

from tokenmill.bench.datasets import ordinary_tokens
from tokenmill.cost.accounting import usd_per_million_tokens
from tokenmill.errors import InvalidRequestError
from tokenmill.flags import add_engine_flags, engine_options, workload_seed
from tokenmill.sampling import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bench offline` flags (the workload's defaults are nano-vllm's benchmark) and the engine flags."""
    parser.add_argument("--num-seqs", type=int, default=256, help="sequences submitted together")
    parser.add_argument("--min-len", type=int, default=100, help="input and output lengths are uniform in")
    parser.add_argument("--max-len", type=int, default=1024, help="[min-len, max-len], as nano-vllm's benchmark")
    parser.add_argument("--decode-len", type=int, default=128, help="tokens for the single-stream decode figure")
    parser.add_argument("--prefill-len", type=int, default=512, help="prompt tokens for the prefill figure")
    parser.add_argument("--seed", type=workload_seed, default=0)
    add_engine_flags(parser)


def main(args: argparse.Namespace) -> int:
    """Run the three measurements and print them."""
    from tokenmill.bench.peers import TokenmillRunner, decode_speed, prefill_speed

    if args.num_seqs < 1 or not 1 <= args.min_len <= args.max_len or args.decode_len < 2 or args.prefill_len < 1:
        raise InvalidRequestError("need --num-seqs and --prefill-len >= 1, --decode-len >= 2 (the decode rate is "
                                  "timed from the first token to the last) and 1 <= --min-len <= --max-len")
    # No prefix cache: the speed runs repeat a prompt, and a cache hit would skip the work being timed.
    runner = TokenmillRunner(**engine_options(args, enable_prefix_caching=False))
    llm = runner.llm
    rng = np.random.default_rng(args.seed)
    ordinary = ordinary_tokens(llm.tokenizer)
    input_lens = rng.integers(args.min_len, args.max_len + 1, args.num_seqs).tolist()
    output_lens = rng.integers(args.min_len, args.max_len + 1, args.num_seqs).tolist()
    prompts = [rng.choice(ordinary, n).tolist() for n in input_lens]

    runner.generate(prompts[:1], 4)  # warm-up
    decode = decode_speed(runner, prompts[0], args.decode_len)
    prefill = prefill_speed(runner, rng.choice(ordinary, args.prefill_len).tolist())
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    # What was generated, not what was asked: a request that fails partway returns fewer tokens.
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    model = llm.engine.runner.model
    tensors = {t.data_ptr(): t.nbytes for t in [*model.parameters(), *model.buffers()]}  # tied weights once
    weights = sum(tensors.values())
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(f"model {llm.engine.source.name} (quantization {llm.engine.runner.quantization}), {args.num_seqs} sequences, lengths uniform in "
          f"[{args.min_len}, {args.max_len}], EOS ignored")
    print(f"throughput: {generated} output tokens in {elapsed:.1f} s = {generated / elapsed:.1f} tokens/s "
          f"({(generated + sum(input_lens)) / elapsed:.1f} tokens/s with prompts)")
    print(f"single-stream decode: {decode:.1f} tokens/s; prefill of {args.prefill_len} tokens: {prefill:.1f} tokens/s")
    print(f"memory: weights {weights / 2**20:.0f} MiB, KV pool {llm.engine.runner.kv_cache.pool.nbytes / 2**20:.0f} MiB, "
          f"process peak RSS {peak_rss / 2**20:.0f} MiB")
    price = llm.engine.cost.price_per_hour
    prompt_s, decode_s = (sum(getattr(o.metrics, part) for o in outputs) for part in ("prefill_seconds", "decode_seconds"))
    print(f"cost at ${price:g}/h (--price-per-hour), busy time only: "
          f"${usd_per_million_tokens(prompt_s + decode_s, generated, price):.4f} per 1M output tokens; "
          f"split by the fitted step times, ${usd_per_million_tokens(prompt_s, sum(input_lens), price):.4f} per 1M "
          f"prompt tokens and ${usd_per_million_tokens(decode_s, generated, price):.4f} per 1M completion tokens")
    return 0
