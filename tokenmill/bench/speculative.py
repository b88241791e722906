"""`tokenmill bench spec`: decode speed with speculative decoding against without it, in the same run."""

import argparse
import json
import time
from importlib import resources

from tokenmill.errors import InvalidRequestError
from tokenmill.flags import add_engine_flags, engine_options
from tokenmill.sampling import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload's flags and the engine flags (--speculative-config is the configuration measured)."""
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens per answer (greedy; EOS ends it)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests submitted together for the batch figure")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating runs of each side; the fastest counts (the machine is shared and noisy)")
    add_engine_flags(parser)


def load_prompts() -> list[dict]:
    """The shipped set: input-grounded prompts (rewrite, copy, edit code) with the text they rework, and open chat."""
    text = resources.files("tokenmill.bench").joinpath("data/speculative_prompts.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main(args: argparse.Namespace) -> int:
    """Time each workload with and without speculation, alternating, and print ratios and acceptance."""
    from tokenmill.env import cpu_features
    from tokenmill.llm import LLM

    if args.repeats < 1 or args.max_tokens < 2 or args.concurrency < 1:  # else a division by zero, after loading
        raise InvalidRequestError("need --repeats >= 1, --max-tokens >= 2 (decode speed runs from the first token to "
                                  "the last) and --concurrency >= 1")
    options = engine_options(args)
    if options["speculative_config"] is None:
        options["speculative_config"] = {"method": "ngram"}
    # No prefix cache: the repeats would otherwise skip the prefill that the first run timed.
    base = LLM(**{**options, "speculative_config": None, "enable_prefix_caching": False})
    spec = LLM(**{**options, "enable_prefix_caching": False})
    items = load_prompts()
    grounded = [i for i in items if i["kind"] == "grounded"]
    open_ended = [i for i in items if i["kind"] == "open"]
    batch = (items * args.concurrency)[: args.concurrency]
    method = spec.engine.config.speculative_config.method
    rows = [
        (f"input-grounded, one at a time, {method}", grounded, False, True),
        ("input-grounded, one at a time, predicted output", grounded, True, True),
        (f"open-ended chat, one at a time, {method}", open_ended, False, True),
        (f"{args.concurrency} concurrent, mixed, {method}", batch, False, False),
    ]
    cpu, features = cpu_features()
    print(f"model {base.engine.source.name}, quantization {base.engine.runner.quantization}, CPU {cpu} "
          f"({', '.join(features)}), speculative config {options['speculative_config']}")
    print("one at a time: decode tokens/s (first token to last); concurrent: output tokens/s of the whole run")
    print(f"{'workload':48} {'tok/s off':>10} {'tok/s on':>10} {'ratio':>6} {'accepted':>9} {'same':>5}")
    for name, workload, predicted, one_at_a_time in rows:
        before = spec.engine.drafter.counters.copy()
        off, on, same = _compare(base, spec, workload, predicted, one_at_a_time, args)
        after = spec.engine.drafter.counters
        drafted = after.num_draft_tokens - before.num_draft_tokens
        accepted = (after.num_accepted_tokens - before.num_accepted_tokens) / drafted if drafted else 0.0
        ratio = on / off if off else 0.0
        print(f"{name:48} {off:10.1f} {on:10.1f} {ratio:5.2f}x {accepted:8.0%} {'yes' if same else 'NO':>5}")
    per_pos = spec.engine.drafter.counters.accepted_per_pos
    drafts = spec.engine.drafter.counters.num_drafts
    print("acceptance by draft position: " + ", ".join(f"{n / drafts:.0%}" for n in per_pos) if drafts else "")
    return 0


def _compare(base, spec, workload: list[dict], predicted: bool, one_at_a_time: bool,
             args: argparse.Namespace) -> tuple[float, float, bool]:
    """Best output tokens/s without and with speculation over alternating repeats, and whether outputs matched."""
    best_off = best_on = 0.0
    same = True
    for _ in range(args.repeats):
        off, off_tokens = _timed(base, workload, False, one_at_a_time, args.max_tokens)
        on, on_tokens = _timed(spec, workload, predicted, one_at_a_time, args.max_tokens)
        best_off, best_on = max(best_off, off), max(best_on, on)
        same = same and off_tokens == on_tokens
    return best_off, best_on, same


def _timed(llm, workload: list[dict], predicted: bool, one_at_a_time: bool,
           max_tokens: int) -> tuple[float, list[list[int]]]:
    """Decode tokens/s of the workload's chat prompts and the tokens: each alone, first token to last (prefill,
    which speculation cannot shorten, left out), or all together, output tokens over the whole run."""
    conversations = [[{"role": "user", "content": item["prompt"]}] for item in workload]
    params = [SamplingParams(temperature=0, max_tokens=max_tokens,
                             prediction=item.get("prediction") if predicted else None) for item in workload]
    prompts = [{"prompt_token_ids": llm.tokenizer.encode_chat(c)} for c in conversations]
    if one_at_a_time:
        outputs = [llm.generate(p, q, use_tqdm=False)[0] for p, q in zip(prompts, params)]
        decoded = sum(len(o.outputs[0].token_ids) - 1 for o in outputs)
        seconds = sum(o.metrics.finished_time - o.metrics.first_token_time for o in outputs)
    else:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        decoded, seconds = sum(len(o.outputs[0].token_ids) for o in outputs), time.perf_counter() - start
    # No time past the first token: every answer ended there (EOS), and there was no decode to time.
    return decoded / seconds if seconds else 0.0, [o.outputs[0].token_ids for o in outputs]
