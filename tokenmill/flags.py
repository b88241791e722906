"""The engine's command-line flags, defined once for every command that builds an engine."""

import argparse
import os
from pathlib import Path
from typing import Any

from tokenmill.config import DTYPE_NAMES, KV_CACHE_DTYPE_NAMES, QUANTIZATIONS, SCHEDULING_POLICIES, EngineConfig


def add_engine_flags(parser: argparse.ArgumentParser, repeat_model: bool = False) -> None:
    """--model and one flag per EngineConfig option, named after its field, with its default.

    With repeat_model, --model may repeat (as on `serve`): every value lands in `models`, the first in `model`.
    """
    d = EngineConfig
    if repeat_model:
        parser.set_defaults(models=[])
        parser.add_argument("--model", default=d.model, action=_RepeatedModel,
                            help="catalog name, .gguf file or HF directory; repeat it to serve several models, "
                                 "NAME=MODEL serves one as NAME (default: %(default)s)")
    else:
        parser.add_argument("--model", default=d.model,
                            help="catalog name, .gguf file or HF directory (default: %(default)s)")
    parser.add_argument("--device", default=d.device, help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--dtype", default=d.dtype, choices=DTYPE_NAMES,
                        help="activation and unquantized weight type (default: %(default)s)")
    parser.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=["auto", *KV_CACHE_DTYPE_NAMES],
                        help="KV pool element type (default: %(default)s: float16 on CPU in float32, else the "
                             "model's dtype)")
    parser.add_argument("--quantization", default=d.quantization, choices=QUANTIZATIONS,
                        help="weight-only quantization of the linear layers (default: %(default)s)")
    parser.add_argument("--quant-group-size", type=int, default=d.quant_group_size,
                        help="weights per quantization step and offset (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV block (default: %(default)s)")
    parser.add_argument("--kv-cache-memory", type=float, default=d.kv_cache_memory,
                        help="KV pool in GiB (default: 1 on CPU, --kv-cache-fraction of free memory on GPU)")
    parser.add_argument("--kv-cache-fraction", type=float, default=d.kv_cache_fraction,
                        help="share of free GPU memory for the KV pool when --kv-cache-memory is unset "
                             "(default: %(default)s)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="on CUDA, run decode steps eagerly instead of replaying captured CUDA graphs")
    parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                        help="sequences decoded together (default: %(default)s)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                        help="tokens per engine step; longer prompts are prefilled in chunks (default: %(default)s)")
    parser.add_argument("--max-model-len", type=int, default=d.max_model_len,
                        help="context length cap (default: the model's, within the KV pool)")
    parser.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV of shared prefixes")
    parser.add_argument("--num-threads", type=int, default=d.num_threads, help="CPU threads (default: one per core)")
    parser.add_argument("--price-per-hour", type=float, default=d.price_per_hour, metavar="USD",
                        help="what the machine costs per hour, to price each request's compute time (default: a "
                             "typical cloud price for this CPU or GPU, stated at start-up)")
    parser.add_argument("--speculative-config", default=None, metavar="JSON",
                        help='speculative decoding, as vLLM: \'{"method": "ngram", "num_speculative_tokens": 4, '
                             '"prompt_lookup_min": 2, "prompt_lookup_max": 5}\' (default: off; a request\'s '
                             'predicted output drafts anyway)')
    parser.add_argument("--scheduling-policy", default=d.scheduling_policy, choices=SCHEDULING_POLICIES,
                        help="deadline: earliest feasible deadline first, refusing requests that cannot meet theirs; "
                             "fcfs: priority, then arrival (default: %(default)s)")


class _RepeatedModel(argparse.Action):
    """--model that may repeat: `models` collects every value, `model` keeps the first for engine_options."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        namespace.models = [*namespace.models, values]  # a new list: the parser's default must stay empty
        setattr(namespace, self.dest, namespace.models[0])


def engine_options(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """The EngineConfig fields those flags set, as keyword arguments for EngineConfig or LLM, with overrides."""
    options = {
        "model": args.model, "device": args.device, "dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype,
        "quantization": args.quantization, "quant_group_size": args.quant_group_size, "block_size": args.block_size,
        "kv_cache_memory": args.kv_cache_memory, "kv_cache_fraction": args.kv_cache_fraction,
        "enforce_eager": args.enforce_eager, "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": args.max_model_len, "enable_prefix_caching": not args.no_prefix_caching,
        "num_threads": args.num_threads, "price_per_hour": args.price_per_hour,
        "speculative_config": args.speculative_config,
        "scheduling_policy": args.scheduling_policy,
    }
    return {**options, **overrides}


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig those flags describe; raises InvalidRequestError for a bad value."""
    return EngineConfig(**engine_options(args))


def output_path(text: str) -> Path:
    """An argparse type for a file a command writes when it ends: its folder checked now, so a typo costs no run."""
    path = Path(text)
    folder = path.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: {folder} is not a folder this user can write to")
    return path


def workload_seed(text: str) -> int:
    """An argparse type for the seed a command draws its workload from: numpy's generators take none below 0."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if seed < 0:
        raise argparse.ArgumentTypeError(f"{seed} is below 0; a workload seed is an integer >= 0")
    return seed
