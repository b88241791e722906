"""Offline throughput: one request alone vs N concurrent, and transformers `generate` on the same batch.

Run: python -m tokenmill.bench.concurrency [--model M] [--num-prompts 16] [--output-len 128] [--rounds 2]
"""

import argparse
import platform
import statistics
import time

import torch

from tokenmill import LLM, SamplingParams

TOPICS = [
    "the history of the printing press", "how volcanoes form", "why the sky is blue", "the rules of chess",
    "making bread at home", "the life cycle of a star", "how vaccines work", "the water cycle",
    "learning a second language", "the invention of the telephone", "how bees make honey",
    "the causes of the seasons", "training for a marathon", "how computers store numbers",
    "the migration of birds", "the architecture of gothic cathedrals",
]


def prompts(count: int) -> list[str]:
    """Varied instruction prompts of 10-20 tokens."""
    return [f"Write a detailed explanation of {TOPICS[i % len(TOPICS)]} for a curious student." for i in range(count)]


def time_tokenmill(llm: LLM, texts: list[str], output_len: int) -> float:
    """Seconds to generate output_len tokens for every prompt together."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(texts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
    return elapsed


def time_transformers(model, tokenizer, texts: list[str], output_len: int) -> float:
    """Seconds for transformers `generate` on the left-padded batch, greedy, exactly output_len tokens."""
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == batch.input_ids.shape[1] + output_len
    return elapsed


def main() -> None:
    """Measure and print a markdown table of tokens/s and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenmill.loader import catalog

    llm = LLM(args.model)
    path = catalog.pull(args.model) if args.model in catalog.CATALOG else llm.engine.source.path
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, padding_side="left")
    texts = prompts(args.num_prompts)
    time_tokenmill(llm, texts[:2], 4)  # warm-up: first-call allocations and kernel selection

    alone, batched, reference = [], [], []
    for _ in range(args.rounds):  # alternate the three so machine noise hits all of them alike
        alone.append(args.output_len / time_tokenmill(llm, texts[:1], args.output_len))
        batched.append(args.num_prompts * args.output_len / time_tokenmill(llm, texts, args.output_len))
        reference.append(args.num_prompts * args.output_len / time_transformers(hf, hf_tok, texts, args.output_len))
    a, b, r = (statistics.median(x) for x in (alone, batched, reference))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; model {args.model}; {args.num_prompts} prompts x {args.output_len} tokens; "
          f"median of {args.rounds} rounds")
    print("| run | output tokens/s | ratio |")
    print("|---|---|---|")
    print(f"| tokenmill, 1 request alone | {a:.1f} | 1.00x |")
    print(f"| tokenmill, {args.num_prompts} concurrent | {b:.1f} | {b / a:.2f}x vs alone |")
    print(f"| transformers generate, {args.num_prompts} left-padded | {r:.1f} | tokenmill is {b / r:.2f}x |")


if __name__ == "__main__":
    main()
