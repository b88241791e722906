"""The engines we measure against, and tokenmill itself, behind one small timing interface."""

import time
from pathlib import Path

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.errors import InvalidRequestError


def decode_speed(runner: "Runner", prompt: list[int], n: int) -> float:
    """Single-stream decode tokens/s, from the first token to the n-th: the prompt's prefill is not in it."""
    # Timed per token rather than as a run of n minus a run of one: after a long prompt the prefill's noise
    # (seconds) swamped the decode's difference.
    times = runner.token_times(prompt, n)
    return (n - 1) / (times[-1] - times[0])


def prefill_speed(runner: "Runner", prompt: list[int]) -> float:
    """Prompt tokens/s of a one-token run on a (long) prompt."""
    return len(prompt) / runner.generate([prompt], 1)


class TokenmillRunner:
    """tokenmill in process: continuous batching over the engine."""

    name = "tokenmill"

    def __init__(self, **engine_options) -> None:
        self.llm = LLM(**engine_options)

    def generate(self, prompts: list[list[int]], output_len: int | list[int]) -> float:
        """Seconds to generate exactly output_len tokens (one for all, or one per prompt), all submitted together."""
        lens = _per_prompt(prompts, output_len)
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens]
        start = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert [len(o.outputs[0].token_ids) for o in outputs] == lens
        return elapsed

    def token_times(self, prompt: list[int], n: int) -> list[float]:
        """When each of n greedy tokens after prompt was made (time.perf_counter), as the engine records it."""
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        output = self.llm.generate([{"prompt_token_ids": prompt}], [params], use_tqdm=False)[0]
        assert len(output.metrics.token_times) == n
        return output.metrics.token_times


class TransformersRunner:
    """Hugging Face transformers `generate` on the same GGUF weights, one left-padded static batch."""

    name = "transformers"

    def __init__(self, gguf: Path, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype).eval()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], output_len: int | list[int]) -> float:
        """Seconds for greedy `generate` on the padded batch; a static batch runs to the longest output_len."""
        output_len = max(_per_prompt(prompts, output_len))
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        start = time.perf_counter()
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_len,
                                  min_new_tokens=output_len, do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - start
        assert out.shape[1] == width + output_len
        return elapsed

    @torch.inference_mode()
    def token_times(self, prompt: list[int], n: int) -> list[float]:
        """When each of n greedy tokens after prompt reached `generate`'s streamer."""
        clock = _StreamClock()
        self.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=0, streamer=clock)
        assert len(clock.times) == n
        return clock.times


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python on the same GGUF file, serving prompts one after another."""

    name = "llama.cpp"

    def __init__(self, gguf: Path, threads: int, n_ctx: int = 4096) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise InvalidRequestError(
                "the llama.cpp peer needs llama-cpp-python: `pip install llama-cpp-python` (builds from source)"
            ) from exc
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_batch=512, verbose=False)

    def generate(self, prompts: list[list[int]], output_len: int | list[int]) -> float:
        """Seconds to generate output_len tokens (EOS ignored) for each prompt in turn."""
        start = time.perf_counter()
        for prompt, output_len in zip(prompts, _per_prompt(prompts, output_len)):
            self.llm.reset()
            produced = 0
            for token in self.llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                produced += 1
                if produced == output_len:
                    break
            assert produced == output_len and token is not None
        return time.perf_counter() - start

    def token_times(self, prompt: list[int], n: int) -> list[float]:
        """When each of n greedy tokens after prompt came out of the generator."""
        self.llm.reset()
        times = []
        for _ in self.llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            times.append(time.perf_counter())
            if len(times) == n:
                break
        assert len(times) == n
        return times


class _StreamClock:
    """A transformers streamer that notes when each new token arrives: `put` first gets the prompt, then each token."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        """Called when generation ends: nothing to note."""


def _per_prompt(prompts: list[list[int]], output_len: int | list[int]) -> list[int]:
    return [output_len] * len(prompts) if isinstance(output_len, int) else list(output_len)


Runner = TokenmillRunner | TransformersRunner | LlamaCppRunner
