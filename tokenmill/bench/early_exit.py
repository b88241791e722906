"""`tokenmill eval early-exit`: for each exit layer, how often its drafts hold and what that does to decode speed."""

import argparse
import time
from pathlib import Path

from tokenmill.errors import InvalidRequestError
from tokenmill.flags import add_engine_flags, engine_options
from tokenmill.sampling import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The text, the layers to try, the draft length, and the engine flags."""
    parser.add_argument("--file", required=True, type=Path, help="UTF-8 text; prompts are windows of it")
    parser.add_argument("--layers", type=int, nargs="+", help="exit layers to try (default: a quarter, half and "
                                                              "three quarters of the model's layers)")
    parser.add_argument("--num-speculative-tokens", type=int, default=3, help="draft tokens per step")
    parser.add_argument("--prompts", type=int, default=4, help="windows of the text, each continued alone")
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per window")
    parser.add_argument("--max-tokens", type=int, default=48, help="greedy tokens per continuation")
    add_engine_flags(parser)


def main(args: argparse.Namespace) -> int:
    """Print acceptance by draft position (always drafting) and speed against no speculation (adaptive) per layer."""
    from tokenmill.llm import LLM

    if args.prompts < 1 or args.prompt_len < 1 or args.max_tokens < 2 or args.num_speculative_tokens < 1:
        raise InvalidRequestError("need --prompts, --prompt-len and --num-speculative-tokens >= 1 and --max-tokens "
                                  ">= 2 (drafts follow the first token)")
    try:
        text = args.file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"{args.file} is not UTF-8 text: {exc}") from None
    base = LLM(**engine_options(args, enable_prefix_caching=False))
    ids = base.tokenizer.encode(text)
    if len(ids) < args.prompt_len:
        raise InvalidRequestError(f"{args.file} has {len(ids)} tokens; --prompt-len is {args.prompt_len}")
    prompts = windows(ids, args.prompt_len, args.prompts)
    num_layers = base.engine.model_config.num_layers
    layers = args.layers or [num_layers // 4, num_layers // 2, 3 * num_layers // 4]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    _speed(base, prompts, params)  # warm-up
    plain, expected = _speed(base, prompts, params)
    print(f"model {base.engine.source.name} ({num_layers} layers), {args.prompts} windows of {args.prompt_len} "
          f"tokens of {args.file}, {args.max_tokens} greedy tokens each; no speculation: {plain:.1f} tokens/s "
          "(tokens/s below: prefill included, each against no speculation measured beside it)")
    print(f"{'layer':>5} {'accepted':>9}  {'by position':<24} {'tok/s':>7} {'ratio':>6}")
    for layer in layers:
        config = {"method": "early_exit", "exit_layer": layer, "num_speculative_tokens": args.num_speculative_tokens}
        always = LLM(**engine_options(args, enable_prefix_caching=False,
                                      speculative_config={**config, "adaptive": False}))
        _, drafted = _speed(always, prompts, params)
        c = always.engine.drafter.counters
        by_position = ", ".join(f"{n / c.num_drafts:.0%}" for n in c.accepted_per_pos)
        adaptive = LLM(**engine_options(args, enable_prefix_caching=False, speculative_config=config))
        _speed(adaptive, prompts, params)  # its cost fit learns here
        # Alternating with no speculation, best of two each: the machine's speed drifts between runs.
        plain = max(_speed(base, prompts, params)[0], _speed(base, prompts, params)[0])
        speed = max(_speed(adaptive, prompts, params)[0], _speed(adaptive, prompts, params)[0])
        accepted = c.num_accepted_tokens / c.num_draft_tokens if c.num_draft_tokens else 0.0
        print(f"{layer:5d} {accepted:8.0%}  {by_position:<24} {speed:7.1f} {speed / plain:5.2f}x")
        if drafted != expected:  # verification must keep every greedy token: this would be a bug
            print(f"error: with exit layer {layer} the greedy outputs differ from no speculation")
            return 1
    return 0


def _speed(llm, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list[list[int]]]:
    """Output tokens/s over the prompts, each alone, and the tokens."""
    start = time.perf_counter()
    outputs = [llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0] for p in prompts]
    elapsed = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outputs]
    return sum(map(len, tokens)) / elapsed, tokens


def windows(ids: list[int], length: int, count: int) -> list[list[int]]:
    """count windows of length tokens a stride apart, none past the text's last full window."""
    # On a text shorter than length + count tokens the stride of 1 ran the last windows past its end.
    last = len(ids) - length
    stride = max(1, last // count)
    return [ids[start : start + length] for start in (min(i * stride, last) for i in range(count))]
