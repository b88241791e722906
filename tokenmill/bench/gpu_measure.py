"""The measurements behind `tokenmill bench gpu`: copy bandwidth, decode step time, offline throughput, each peer's."""

import gc
import statistics
import time
from pathlib import Path

import torch

from tokenmill.sampling import SamplingParams


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes moved (read and written) per second by a device-to-device copy, best of a few."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def decode_step_seconds(llm, steps: int) -> float:
    """Median seconds of one decode step of a single sequence."""
    engine = llm.engine
    engine.add_request("decode", [5] * 16, SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True))
    times = []
    engine.step()  # the prompt
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    while engine.has_unfinished():
        engine.step()
    return statistics.median(times[steps // 4:])  # the first steps warm caches and allocators


def offline_tokens_per_second(llm, prompts: list[list[int]], output_len: int) -> float:
    """Output tokens per second of LLM.generate over every prompt at once."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], SamplingParams(temperature=0, max_tokens=4))
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    sync(llm.engine.runner.device)
    return sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)


def transformers_tokens_per_second(model, prompts: list[list[int]], output_len: int) -> float:
    """Output tokens per second of transformers' generate on the whole batch (equal lengths: no padding)."""
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)
    with torch.no_grad():
        options = dict(attention_mask=torch.ones_like(ids), pad_token_id=0, do_sample=False)
        model.generate(ids[:2], max_new_tokens=4, **{**options, "attention_mask": options["attention_mask"][:2]})
        sync(device)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **options)
        sync(device)
    return (out.shape[1] - ids.shape[1]) * len(prompts) / (time.perf_counter() - start)


def save_random_llama(path: Path, shape: dict, dtype: torch.dtype):
    """A random-weight Llama saved as a Hugging Face directory (with a byte-level tokenizer); its transformers model."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    config = transformers.LlamaConfig(architectures=["LlamaForCausalLM"], max_position_embeddings=4096,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, **shape)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(path)
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path / "tokenizer.json"))
    return model


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer reads the work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or CPU."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def release(device: torch.device) -> None:
    """Give a deleted engine's memory back to the device: torch keeps what it freed cached, which the next engine's
    KV pool, sized from the device's free memory, would not count (the later pools came out about 5x smaller)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
