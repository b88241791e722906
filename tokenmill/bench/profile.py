"""`tokenmill bench profile`: this machine's engine step time by batch composition, timed on the real engine."""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tokenmill.bench.datasets import ordinary_tokens
from tokenmill.cost.step_times import PROFILE_VERSION
from tokenmill.errors import InvalidRequestError
from tokenmill.flags import add_engine_flags, engine_options, output_path, workload_seed
from tokenmill.sampling import SamplingParams

if TYPE_CHECKING:
    from tokenmill.engine.llm_engine import LLMEngine

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bench profile` flags and the engine flags."""
    parser.add_argument("--prefill-tokens", type=int, nargs="+",
                        help="prompt tokens per timed step (default: 0 16 64, then doubling up to "
                             "--max-num-batched-tokens)")
    parser.add_argument("--decode-seqs", type=int, nargs="+",
                        help="decoding sequences per timed step (default: 0 1 2 4 ... up to --max-num-seqs)")
    parser.add_argument("--context", type=int, default=128, help="tokens each decoding sequence holds in the grid")
    parser.add_argument("--sweep-contexts", type=int, nargs="*", default=[128, 512, 1024],
                        help="decode context lengths timed for the context effect (none: skip it)")
    parser.add_argument("--sweep-seqs", type=int, default=16, help="decoding sequences in the context sweep")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per cell; the median is kept")
    parser.add_argument("--seed", type=workload_seed, default=0)
    parser.add_argument("--out", type=output_path, default=Path("profile.json"), help="where the JSON goes")
    add_engine_flags(parser)


def main(args: argparse.Namespace) -> int:
    """Time the grid and the context sweep on the engine the flags describe, and write the JSON."""
    import torch  # here, not at the top: the CLI imports this module, and `tokenmill --help` stays fast

    from tokenmill.cost.prices import machine_price
    from tokenmill.env import cpu_features
    from tokenmill.llm import LLM

    settings = engine_options(args)
    prefills = sorted(set(args.prefill_tokens or default_prefills(settings["max_num_batched_tokens"])))
    decodes = sorted(set(args.decode_seqs or _doubling([0], 1, settings["max_num_seqs"])))
    _check(args, prefills, decodes)
    # The timed steps need room for the largest cell, whatever the planned settings; those only steer
    # the scheduler, not what a step of a given composition costs. No prefix cache: a hit would skip the work.
    llm = LLM(**engine_options(
        args, enable_prefix_caching=False, max_num_seqs=max(settings["max_num_seqs"], max(decodes) + 1),
        max_num_batched_tokens=max(settings["max_num_batched_tokens"], max(prefills) + max(decodes)),
    ))
    engine = llm.engine
    profiler = StepProfiler(engine, args.repeats, args.seed)
    profiler.warm_up()
    grid = [profiler.time_cell(p, d, args.context) for d in decodes for p in prefills if p or d]
    sweep = [profiler.time_cell(0, args.sweep_seqs, c) for c in args.sweep_contexts]
    cpu, features = cpu_features()
    price = machine_price(settings["price_per_hour"], settings["device"])  # after the engine set torch's threads
    report = {
        "version": PROFILE_VERSION,
        "machine": {"cpu": cpu, "features": features, "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(settings["device"]) if settings["device"] != "cpu" else None,
                    "torch": torch.__version__, "python": platform.python_version()},
        "model": engine.source.name,
        "settings": {**{k: v for k, v in settings.items() if k not in ("model", "price_per_hour")},
                     "quantization": engine.runner.quantization,  # what `auto` resolved to
                     "num_blocks": engine.block_manager.num_blocks, "max_model_len": engine.max_model_len,
                     # The sliding-window layout, so the planner releases blocks as the engine does.
                     "sliding_window": engine.runner.sliding_window,
                     "num_sliding_blocks": engine.runner.num_sliding_blocks},
        # `tokenmill plan` bills at this price unless given its own --price-per-hour.
        "price": {"usd_per_hour": price.usd_per_hour, "basis": price.basis},
        "context": args.context,
        "repeats": args.repeats,
        "grid": grid,
        "context_sweep": sweep,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(format_profile(report))
    print(f"wrote {args.out}")
    return 0


class StepProfiler:
    """Builds batches of a known composition on a live engine and times engine.step() on them."""

    def __init__(self, engine: "LLMEngine", repeats: int, seed: int) -> None:
        self.engine = engine
        self.repeats = repeats
        self.rng = np.random.default_rng(seed)
        self.ordinary = ordinary_tokens(engine.tokenizer)
        self._ids = 0

    def warm_up(self) -> None:
        """A few untimed steps, so first-call costs (allocation, kernel set-up) stay out of the table."""
        self.time_cell(64, 4, 32)

    def time_cell(self, prefill_tokens: int, decode_seqs: int, context: int) -> dict:
        """Time `repeats` steps that decode decode_seqs sequences of about context tokens and prefill one prompt.

        Returns the JSON's cell: its composition, the decodes' mean context, the median and every run in ms.
        """
        # Room to decode through their siblings' prefill and the timed steps; they are aborted after.
        room = self.engine.max_model_len - context
        if room <= self.repeats:
            raise InvalidRequestError(f"a context of {context} tokens leaves no room to decode in this engine's "
                                      f"{self.engine.max_model_len}; lower --context or --sweep-contexts")
        decoding = [self._add(context, max_tokens=room) for _ in range(decode_seqs)]
        preemptions = self.engine.scheduler.num_preemptions
        # Prefill the decoding sequences (untimed) until each computes one token a step.
        while self.engine.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in self.engine.scheduler.running):
            self.engine.step()
        contexts, times = [], []
        for _ in range(self.repeats):
            contexts.extend(s.num_computed_tokens for s in self.engine.scheduler.running)
            # One output token: the prompt finishes in the timed step, sampling included, and frees its blocks.
            prompt = self._add(prefill_tokens, max_tokens=1) if prefill_tokens else None
            start = time.perf_counter()
            self.engine.step()
            times.append(time.perf_counter() - start)
            if prompt is not None and prompt in self.engine.requests:
                raise InvalidRequestError(f"a {prefill_tokens}-token prompt did not fit one step; "
                                          "raise --max-num-batched-tokens")
        for request_id in decoding:
            self.engine.abort(request_id)
        if self.engine.scheduler.num_preemptions > preemptions:  # a recompute would have been timed too
            raise InvalidRequestError(f"{decode_seqs} sequences of {context} tokens overflowed the KV pool; "
                                      "raise --kv-cache-memory or lower --decode-seqs / --sweep-contexts")
        return {"prefill_tokens": prefill_tokens, "decode_seqs": decode_seqs,
                "decode_context": round(statistics.mean(contexts), 1) if contexts else 0,
                "ms": round(statistics.median(times) * 1000, 3),
                "runs_ms": [round(t * 1000, 3) for t in times]}

    def _add(self, num_tokens: int, max_tokens: int) -> str:
        request_id = f"profile-{self._ids}"
        self._ids += 1
        prompt = self.rng.choice(self.ordinary, num_tokens).tolist()
        self.engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                   ignore_eos=True))
        return request_id


def _doubling(start: list[int], first: int, limit: int) -> list[int]:
    """start, then first, 2 * first, ... below limit, then limit itself."""
    values, v = [x for x in start if x < limit], first
    while v < limit:
        values.append(v)
        v *= 2
    return values + [limit]


def default_prefills(budget: int) -> list[int]:
    """Prompt sizes to time up to a step's token budget: 0, then two above it at least, as the planner needs."""
    return _doubling([0, max(2, min(16, budget // 2)), 64], 128, budget)


def _check(args: argparse.Namespace, prefills: list[int], decodes: list[int]) -> None:
    if any(p < 0 or p == 1 for p in prefills):
        # A one-token row is scheduled as a decode, so a one-token prefill cell would time a decode.
        raise InvalidRequestError("--prefill-tokens must be 0 or at least 2")
    if len({p for p in prefills if p}) < 2:  # a prompt-only step's time is a line through two sizes at least
        raise InvalidRequestError("--prefill-tokens needs two sizes above 0 at least")
    if any(d < 0 for d in decodes):
        raise InvalidRequestError("--decode-seqs must be >= 0")
    if args.repeats < 1 or args.context < 1 or args.sweep_seqs < 1 or any(c < 1 for c in args.sweep_contexts):
        raise InvalidRequestError("--repeats, --context, --sweep-seqs and --sweep-contexts must be at least 1")


def format_profile(report: dict) -> str:
    """The grid as a table: one row per decode batch, one column per prompt size, milliseconds per step."""
    prefills = sorted({c["prefill_tokens"] for c in report["grid"]})
    cells = {(c["prefill_tokens"], c["decode_seqs"]): c["ms"] for c in report["grid"]}
    s = report["settings"]
    lines = [f"{report['model']} ({s['quantization']}, {s['dtype']}) on {report['machine']['cpu']}, "
             f"{report['machine']['threads']} threads: ms per step, decodes at {report['context']} tokens of context",
             "decodes \\ prompt tokens " + "".join(f"{p:>9}" for p in prefills)]
    for d in sorted({c["decode_seqs"] for c in report["grid"]}):
        lines.append(f"{d:>23} " + "".join(f"{cells[p, d]:>9.1f}" if (p, d) in cells else f"{'':>9}"
                                           for p in prefills))
    for c in report["context_sweep"]:
        lines.append(f"{c['decode_seqs']} decodes at {c['decode_context']:.0f} tokens of context: {c['ms']:.1f} ms")
    return "\n".join(lines)
