"""`tokenmill bench structured`: decode speed with a JSON schema against without, and the mask's own time."""

import argparse
import statistics
import time

from tokenmill.errors import InvalidRequestError
from tokenmill.flags import add_engine_flags, engine_options
from tokenmill.sampling import SamplingParams
from tokenmill.structured.params import StructuredOutput

# Records with a string, a bounded integer, a number and a short array; minItems keeps the grammar open, so both
# sides decode exactly max_tokens and the comparison is per token.
SCHEMA = {
    "type": "array", "minItems": 1000,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        },
        "required": ["name", "age", "score", "tags"],
        "additionalProperties": False,
    },
}
PROMPT = "List some people as JSON records with name, age, score and tags."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload's flags and the engine flags."""
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (both sides decode all of them)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16], help="requests submitted together")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating runs of each side; the fastest counts (the machine is shared and noisy)")
    add_engine_flags(parser)


def main(args: argparse.Namespace) -> int:
    """Print decode tokens/s without and with the schema at each concurrency, their ratio, and the mask time."""
    import torch

    from tokenmill.env import cpu_features
    from tokenmill.llm import LLM

    if args.repeats < 1 or args.max_tokens < 2 or min(args.concurrency) < 1:  # else a division by zero, after loading
        raise InvalidRequestError("need --repeats >= 1, --max-tokens >= 2 (decode speed runs from the first token to "
                                  "the last) and every --concurrency >= 1")
    llm = LLM(**{**engine_options(args), "enable_prefix_caching": False})
    prompt = {"prompt_token_ids": llm.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])}
    print(f"model {llm.engine.source.name}, CPU {cpu_features()[0]}, "
          f"{torch.get_num_threads()} threads, {args.max_tokens} tokens per answer")
    print(f"{'concurrent':>10} {'tok/s free':>11} {'tok/s schema':>13} {'ratio':>6}")
    constrained_tokens: list[int] = []
    for n in args.concurrency:
        free = schema = 0.0
        for _ in range(args.repeats):
            free = max(free, _decode_speed(llm, prompt, n, args.max_tokens, None)[0])
            speed, tokens = _decode_speed(llm, prompt, n, args.max_tokens, StructuredOutput(json=SCHEMA))
            schema, constrained_tokens = max(schema, speed), tokens
        print(f"{n:>10} {free:11.1f} {schema:13.1f} {schema / free:5.2f}x")
    for rows in (1, 16):
        print(f"mask for {rows:>2} rows: {_mask_ms(llm.tokenizer, constrained_tokens, rows):.3f} ms per step (median)")
    return 0


def _decode_speed(llm, prompt: dict, n: int, max_tokens: int,
                  constraint: StructuredOutput | None) -> tuple[float, list[int]]:
    """Decode tokens/s of n requests together (first token to last, so prefill is not counted), and one's tokens."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, structured_output=constraint)
    outputs = llm.generate([prompt] * n, params, use_tqdm=False)
    times = [o.metrics.token_times for o in outputs]
    decoded = sum(len(t) - 1 for t in times)
    return decoded / (max(t[-1] for t in times) - min(t[0] for t in times)), outputs[0].outputs[0].token_ids


def _mask_ms(tokenizer, token_ids: list[int], rows: int) -> float:
    """Median time to compute and apply the masks of `rows` sequences following token_ids, one step each."""
    import torch

    from tokenmill.structured.mask import apply_masks
    from tokenmill.structured.matcher import GrammarState

    states = [GrammarState(StructuredOutput(json=SCHEMA), tokenizer) for _ in range(rows)]
    logits = torch.zeros(rows, tokenizer.vocab_size)
    times = []
    for token in token_ids:
        start = time.perf_counter()
        apply_masks(logits, list(range(rows)), states)
        times.append(time.perf_counter() - start)
        for state in states:
            state.advance(token)
    return statistics.median(times) * 1e3


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
