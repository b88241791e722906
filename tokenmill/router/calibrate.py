"""`tokenmill router calibrate`: the served models answer a labeled set; the quality-cost curve of each policy."""

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenmill.errors import InvalidRequestError
from tokenmill.flags import add_engine_flags, engine_options, output_path
from tokenmill.router import curve
from tokenmill.router.labeled import SHIPPED, Item, is_correct, load_items
from tokenmill.router.policies import mean_logprob

if TYPE_CHECKING:  # the tokenizer libraries load only when a model does, so `tokenmill --help` stays fast
    from tokenmill.loader.tokenizer import Tokenizer

# A model with a chat template (smollm2-135m) gets each question as one user turn in it, as `serve` renders a
# chat request for it. A base model without one (gemma3-270m) given a bare question continues it as text (more
# questions, or a run-on), so it gets worked examples first, one "Q: ... A: ..." per line, and its answer ends at
# the line. None of the examples is in the shipped set (a test checks), so no answer is given away.
FEW_SHOT = (("What is the capital of Scotland?", "Edinburgh"), ("What is 14 + 3?", "17"),
            ('What is the opposite of "true"?', "false"), ("What color is a crow?", "black"),
            ('Who wrote "Hamlet"?', "William Shakespeare"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The calibration flags and the engine flags, with --model repeated as on `serve`."""
    parser.add_argument("--eval", type=Path, default=SHIPPED, metavar="FILE.jsonl",
                        help="labeled set, one JSON object per line with prompt, answer, check (exact, contains or "
                             "numeric) and level (easy or hard) (default: the shipped set of 300 items)")
    parser.add_argument("--max-tokens", type=int, default=24,
                        help="tokens per answer; the set's answers are a few words (default: %(default)s)")
    parser.add_argument("--target-quality", type=float, default=None,
                        help="fraction right the cascade must reach (default: 0.9 of the second model's)")
    parser.add_argument("--plot", type=output_path, metavar="PATH", help="write the quality-cost curve as a PNG")
    parser.add_argument("--json", type=output_path, metavar="PATH", help="write every answer and every point as JSON")
    add_engine_flags(parser, repeat_model=True)


def main(args: argparse.Namespace) -> int:
    """Run every model on every item, then print the table and the threshold that reaches the target cheapest."""
    from tokenmill.loader.source import check_named
    from tokenmill.sampling import SamplingParams
    from tokenmill.server.served_models import ModelSpec

    specs = [ModelSpec.parse(value) for value in args.models]
    if len(specs) < 2:
        raise InvalidRequestError("router calibrate compares models: give two or more --model values, cheap to "
                                  "strong, as to `serve` (e.g. --model smollm2-135m --model gemma3-270m)")
    if args.target_quality is not None and not 0 <= args.target_quality <= 1:
        raise InvalidRequestError(f"--target-quality {args.target_quality} must be a fraction in [0, 1]")
    SamplingParams(max_tokens=args.max_tokens)  # a bad value fails here, before the slow model loads
    for spec in specs:  # as must a mistake in the last model, which loads after the first answered the whole set
        check_named(spec.model)
    items = load_items(args.eval)
    names = [spec.name or spec.model for spec in specs]
    records = [curve.Record(item, []) for item in items]
    for name, spec in zip(names, specs):
        start = time.perf_counter()
        for record, answer in zip(records, answer_all(items, engine_options(args, model=spec.model), args.max_tokens)):
            record.answers.append(answer)
        print(f"{name}: {len(items)} items in {time.perf_counter() - start:.1f} s (load included)")

    points = curve.curve(records, names)
    target = curve.default_target(records) if args.target_quality is None else args.target_quality
    best = curve.best_threshold(points, target)
    print(curve.table(points, best))
    print(_verdict(points, best, target, curve.single(records, 1, names[1])))
    if args.plot:
        from tokenmill.router.plot import plot_curve

        plot_curve(points, best, target, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(_report(names, records, points, best, target), indent=1))
        print(f"json: {args.json}")
    return 0


def answer_all(items: list[Item], options: dict[str, Any], max_tokens: int) -> list[curve.Answer]:
    """One model's greedy answer to every item, batched, with its correctness, confidence and cost."""
    from tokenmill.llm import LLM
    from tokenmill.sampling import SamplingParams

    llm = LLM(**options)
    chat = bool(llm.tokenizer.chat_template)
    # logprobs=0: the chosen tokens' logprobs only, as the server's cascade asks for.
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, stop=[] if chat else ["\n"])
    prompts = [_chat_prompt(llm.tokenizer, item.prompt) if chat else _few_shot_prompt(item.prompt) for item in items]
    outputs = llm.generate(prompts, params)
    answers = []
    for item, output in zip(items, outputs):
        text = output.outputs[0].text
        answers.append(curve.Answer(text, is_correct(item, text), mean_logprob([output]), output.metrics.cost_usd))
    return answers


def _chat_prompt(tokenizer: "Tokenizer", question: str) -> dict[str, list[int]]:
    return {"prompt_token_ids": tokenizer.encode_chat([{"role": "user", "content": question}])}


def _few_shot_prompt(question: str) -> str:
    return "".join(f"Q: {q}\nA: {a}\n" for q, a in FEW_SHOT) + f"Q: {question}\nA:"


def _verdict(points: list[curve.Point], best: curve.Point | None, target: float, strong: curve.Point) -> str:
    if best is None:
        top = max((p for p in points if p.policy == "cascade"), key=lambda p: p.quality)
        return (f"no cascade threshold reaches quality {target:.3f}; the highest is {top.quality:.3f} at threshold "
                f"{top.threshold:.4g}: lower --target-quality or add a stronger model")
    if strong.quality >= target and strong.cost_usd <= best.cost_usd:
        # An unsure cheap model pays twice for what it escalates: past some point, the strong model alone is cheaper.
        return (f"target quality {target:.3f}: {strong.policy} alone reaches {strong.quality:.3f} at "
                f"{strong.cost_usd:.3g} USD per item, no more than the cheapest cascade that does (threshold "
                f"{best.threshold:.4g}: {best.quality:.3f} at {best.cost_usd:.3g}); serve {strong.policy} alone")
    serve = ("--router cheapest (never escalating is the first model alone)" if best.escalated == 0
             else f"--router cascade --cascade-threshold={best.threshold:.4g}")
    return (f"target quality {target:.3f}: cascade threshold {best.threshold:.4g} reaches {best.quality:.3f} at "
            f"{best.cost_usd:.3g} USD per item, escalating {best.escalated:.0%} "
            f"({strong.policy} alone: {strong.quality:.3f} at {strong.cost_usd:.3g}); serve with {serve}")


def _report(names: list[str], records: list[curve.Record], points: list[curve.Point], best: curve.Point | None,
            target: float) -> dict[str, Any]:
    def point(p: curve.Point) -> dict[str, Any]:
        # JSON has no infinity: the never and always escalating thresholds are written "-inf" and "inf".
        fields = asdict(p)
        if p.threshold is not None and not math.isfinite(p.threshold):
            fields["threshold"] = str(p.threshold)
        return fields

    return {
        "models": names, "target_quality": target, "best": point(best) if best else None,
        "points": [point(p) for p in points],
        "records": [{"item": asdict(r.item), "answers": [asdict(a) for a in r.answers]} for r in records],
    }
