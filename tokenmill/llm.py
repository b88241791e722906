"""LLM: the offline API, `LLM(model).generate(prompts, params)` as in vLLM."""

import itertools
import logging
import threading
from dataclasses import fields, replace
from typing import Any

import torch
from tqdm import tqdm

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.errors import InvalidRequestError, whole_number
from tokenmill.loader.tokenizer import Tokenizer
from tokenmill.outputs import RequestOutput, accumulate
from tokenmill.sampling import SamplingParams

Prompt = str | list[int] | dict[str, Any]
# vLLM's other names for the dtypes.
_DTYPE_ALIASES = {"half": "float16", "float": "float32"}

logger = logging.getLogger(__name__)


class LLM:
    """Load a model once and generate for batches of prompts."""

    def __init__(self, model: str = EngineConfig.model, **engine_options: Any) -> None:
        engine_options = _vllm_options(engine_options)
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(engine_options) - known - {"seed"}
        if unknown:
            raise InvalidRequestError(f"unknown engine options {sorted(unknown)}; known: {sorted(known)}")
        if (seed := engine_options.pop("seed", None)) is not None:
            if not whole_number(seed):
                raise InvalidRequestError(f"seed={seed!r} must be an integer", param="seed")
            # As vLLM's engine seed: the draws of requests without their own seed come from torch's generator.
            torch.manual_seed(seed)
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))
        self._ids = itertools.count()
        # One call steps the engine at a time: two threads stepping it took each other's outputs (wrong text, or a
        # KeyError), where vLLM's LLM is documented as not thread-safe.
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (encode / decode / encode_chat)."""
        return self.engine.tokenizer

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer, by vLLM's method name."""
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The params a call without any uses: the model's recommended settings (generation_config.json, or a GGUF's
        general.sampling.*) over SamplingParams' defaults, as vLLM's method of this name."""
        return SamplingParams(**self.engine.source.sampling_defaults)

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt together (continuous batching); whole outputs in prompt order. As in vLLM's
        offline engine, a max_tokens past the model's context stops there, with finish_reason "length"."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        many = isinstance(sampling_params, (list, tuple))  # one per prompt (a tuple too, as vLLM takes any sequence)
        params = list(sampling_params) if many else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        with self._lock:
            try:
                for request_id, prompt, p in zip(ids, prompts, params):
                    p = p or self.get_default_sampling_params()
                    if isinstance(prompt, dict) and prompt.get("cache_salt") is not None:  # vLLM's prompt field
                        p = replace(p, cache_salt=prompt["cache_salt"])
                    self.engine.add_request(request_id, _prompt_input(prompt), p, fit_context=True)
            except BaseException:  # an invalid prompt, or Ctrl-C while a long list queues: none of them stays queued
                for request_id in ids:
                    self.engine.abort(request_id)
                raise
            return self._run(ids, use_tqdm if use_tqdm is not None else len(ids) >= 16)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool | None = None,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Render one conversation (or a list of them), and the tools on offer, as /v1/chat/completions does; reply.
        chat_template_kwargs: the template's own variables (Qwen3's enable_thinking), as in vLLM."""
        # Imported here: chat's message and tool helpers serve only chat, not generate.
        from tokenmill.server.protocol import content_text
        from tokenmill.structured.tools import chat_prompt

        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conversation in conversations:
            for m in conversation:  # as the server's schema checks them: else a KeyError or TypeError from within
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
                        not isinstance(m.get("content"), (str, list, type(None))):
                    raise InvalidRequestError(f"each message must be a dict with a string role and string, list of "
                                              f"parts or None content; got {m!r:.80}", param="messages")
            # Content as one string (OpenAI's text parts joined, None beside tool calls empty), which templates
            # concatenate; every other key (roles, tool calls, a template's own fields) as given.
            # `developer` is OpenAI's newer name for `system`, as the server reads it.
            flat = [{**m, "content": content_text(m.get("content")),
                     **({"role": "system"} if m.get("role") == "developer" else {})} for m in conversation]
            prompts.append({"prompt_token_ids": chat_prompt(self.tokenizer, flat, tools or [], False,
                                                            add_generation_prompt, continue_final_message,
                                                            chat_template_kwargs)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        whole: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", disable=not use_tqdm) as bar:
            try:
                while self.engine.has_unfinished():
                    for output in self.engine.step():
                        whole[output.request_id] = accumulate(whole.get(output.request_id), output)
                        bar.update(output.finished)
                    _mark_failed(whole, self.engine.take_failures())
            except BaseException:  # Ctrl-C or a bug: leave the engine clean for the next call
                for request_id in ids:
                    self.engine.abort(request_id)
                raise
        outputs = [whole[i] for i in ids]
        for output in outputs:  # vLLM's Logprob carries each token's text
            for position in [*(output.prompt_logprobs or []), *(lp for s in output.outputs for lp in s.logprobs or [])]:
                if position is not None:
                    position.texts.update((t, self.tokenizer.decoded_token(t)) for t in position)
        return outputs


def _mark_failed(whole: dict[str, RequestOutput], failures: dict[str, Exception]) -> None:
    """A request that failed alone (the others go on) ends with finish_reason "error", not "abort"; its error is logged."""
    for request_id, error in failures.items():
        logger.error("request %s failed and was ended: %s", request_id, error)
        for sample in whole[request_id].outputs if request_id in whole else []:
            if sample.finish_reason == "abort":
                sample.finish_reason = "error"


def _vllm_options(options: dict[str, Any]) -> dict[str, Any]:
    """vLLM's LLM(...) arguments that scripts pass as a matter of course, as this engine's options."""
    options = dict(options)
    options.pop("trust_remote_code", None)  # no model code is fetched or run here: every architecture is built in
    if (parallel := options.pop("tensor_parallel_size", 1)) != 1:
        raise InvalidRequestError(f"tensor_parallel_size={parallel!r}: tokenmill runs a model on one device")
    if "device" not in options and torch.cuda.is_available():
        # vLLM's LLM takes the GPU by itself; a script written for it would run here on the CPU, slowly and silently.
        logger.warning("LLM() runs on the CPU unless given device='cuda'; this machine has a CUDA GPU")
    if "gpu_memory_utilization" in options:
        # vLLM's share of the whole GPU; here the share of what loading left free goes to the KV pool, which on a
        # GPU with nothing else on it ends in about the same pool.
        options.setdefault("kv_cache_fraction", options.pop("gpu_memory_utilization"))
    if options.get("dtype") == "auto":  # the engine's own choice, as vLLM's
        del options["dtype"]
    elif options.get("dtype") in _DTYPE_ALIASES:
        options["dtype"] = _DTYPE_ALIASES[options["dtype"]]
    return options


def _prompt_input(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, dict):
        unknown = set(prompt) - {"prompt", "prompt_token_ids", "cache_salt"}
        if unknown:  # multi_modal_data above all: an image prompt answered as if without its image
            raise InvalidRequestError(f"a dict prompt takes 'prompt' or 'prompt_token_ids' and 'cache_salt'; this "
                                      f"text-only engine cannot use {sorted(unknown)}")
        if "prompt_token_ids" in prompt:
            return _token_ids(prompt["prompt_token_ids"])
        if isinstance(prompt.get("prompt"), str):
            return prompt["prompt"]
        raise InvalidRequestError("a dict prompt needs 'prompt' (a string) or 'prompt_token_ids'")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return _token_ids(prompt)
    raise InvalidRequestError(f"a prompt must be a string, a list of token ids or a dict, not {type(prompt).__name__}")


def _token_ids(ids: object) -> list[int]:
    """ids as Python ints (a NumPy array's too): not floats, strings or nested lists, which failed deep inside."""
    listed = not isinstance(ids, str | bytes | dict) and hasattr(ids, "__iter__")
    items = list(ids) if listed else []
    if not listed or not all(whole_number(t) for t in items):
        raise InvalidRequestError("prompt_token_ids must be a list of integer token ids", param="prompt_token_ids")
    return [int(t) for t in items]
