"""Read a GGUF file: metadata to ModelConfig, tensors dequantized and renamed to Hugging Face names."""

import math
import mmap
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from tokenmill.config import ModelConfig, gemma3_layer_types
from tokenmill.errors import ModelLoadError
from tokenmill.quant.levels import LevelRows

# GGUF per-layer tensor names to Hugging Face module paths.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # Qwen3 and Gemma 3: RMSNorm over each query and key head.
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    # Gemma 3's norms after attention and around the MLP (its ffn_norm is the pre-MLP one).
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Where an architecture's GGUF names mean other Hugging Face modules than Llama's.
_ARCH_LAYER_NAMES = {"gemma3": {"ffn_norm": "pre_feedforward_layernorm"}}
# Mixture-of-experts files (those with {arch}.expert_count): the router, each expert's projections, which
# llama.cpp stacks into one [experts, rows, columns] tensor per projection ({} is the expert), and Qwen2-MoE's
# shared expert and its gate. Mapped only in such files, so a dense model's load still rejects them by name.
_MOE_LAYER_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.{}.gate_proj",
    "ffn_up_exps": "mlp.experts.{}.up_proj",
    "ffn_down_exps": "mlp.experts.{}.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
# llama.cpp writes Mixtral as a llama file with experts; its checkpoints name the experts' projections w1/w3/w2.
_ARCH_MOE_LAYER_NAMES = {
    "llama": {
        "ffn_gate_inp": "block_sparse_moe.gate",
        "ffn_gate_exps": "block_sparse_moe.experts.{}.w1",
        "ffn_up_exps": "block_sparse_moe.experts.{}.w3",
        "ffn_down_exps": "block_sparse_moe.experts.{}.w2",
    },
}
# Whether the top-k routing weights are rescaled to sum to 1 where the file does not say (expert_weights_norm):
# llama.cpp's own rule per architecture, as transformers' norm_topk_prob defaults (Mixtral always rescales).
_MOE_NORM_TOPK = {"qwen2moe": False, "qwen3moe": True}
# Gemma's RMSNorm scales by 1 + weight; llama.cpp's converter stores the 1 + weight.
_NORM_OFFSET_ARCHITECTURES = {"gemma3"}
# Gemma 3's sliding layers (config.gemma3_layer_types) have a rotary base of 10,000; llama.cpp fixes it rather
# than storing it (its gemma3 hparams), as transformers does.
_GEMMA3_LOCAL_THETA = 10_000.0
# Gemma 3 27B (its 62 layers tell it apart) scales attention by (hidden / heads) ** -0.5, its config's
# query_pre_attn_scalar of 168, not head_dim ** -0.5; a GGUF file does not say so, and llama.cpp decides it so too.
_GEMMA3_27B_LAYERS = 62
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_LINEAR_PARTS = {
    "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
    "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp",
}
# The sampling settings a file's author recommends (general.sampling.*, written by llama.cpp's converter from
# generation_config.json), by SamplingParams' names: llama.cpp samples with them where a request leaves them unset.
_SAMPLING_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
                  "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
                  "general.sampling.penalty_repeat": "repetition_penalty"}
_FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
# The block types whose grids int4 and int8 layers hold exactly (32 inputs a block, w = d * q + m), with their
# levels' bits: a layer of at least as many bits takes them unchanged.
_LEVEL_BITS = {GGMLQuantizationType.Q4_0: 4, GGMLQuantizationType.Q4_1: 4, GGMLQuantizationType.Q5_0: 5,
               GGMLQuantizationType.Q5_1: 5, GGMLQuantizationType.Q8_0: 8}
# The types whose levels are centred (w = d * (q - centre)), by their centre; Q4_1 and Q5_1 store an offset m
# after the step d instead.
_CENTRES = {GGMLQuantizationType.Q4_0: 8, GGMLQuantizationType.Q5_0: 16, GGMLQuantizationType.Q8_0: 128}

# Float32 elements dequantized per slice of rows, and per piece of a tensor handed to the model
# (1 MiB: each piece is alive beside the loaded weights, at the load's peak memory).
_DEQUANTIZE_ELEMENTS = 1 << 18

# llama.cpp's converter interleaves the rotary halves of Q and K rows for these architectures only.
_PERMUTED_ARCHITECTURES = {"llama"}


class _Reader(GGUFReader):
    """GGUFReader slicing a plain ndarray view of its memory map, and reading arrays in one pass.

    np.memmap's bookkeeping on every slice made parsing a 49k-token vocabulary take over 6 s; gguf's loop over an
    array's elements, an array object or two made for each, took 0.5 s of the 0.66 s left (2.5 s for Gemma 3's 262k).
    """

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        plain = self.__dict__.setdefault("_plain", self.data.view(np.ndarray))
        count = int(count)
        arr = plain[offset : offset + np.dtype(dtype).itemsize * count].view(dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list[Any]]:
        """An array of numbers or of strings as one part each, read without a call per element; the rest as gguf reads it.

        ReaderField.contents() gives the same list for a number array (it joins its data parts). An array of strings
        is one part, its strings' lengths and bytes as the file has them, which _strings() decodes (not contents()).
        gguf's two array objects a string took SmolLM2's parse to +30 MiB (now +11), and, freed, left the pymalloc
        pools of the strings decoded between them empty but held: 3 MiB more after the load (docs/benchmarks.md).
        """
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        item_type, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        item, offs = GGUFValueType(item_type[0]), orig_offs + 12
        parts, data = [item_type, count], []
        if item == GGUFValueType.STRING:
            plain = self.__dict__["_plain"]
            raw = memoryview(plain)
            for _ in range(int(count[0])):
                size = int.from_bytes(raw[offs : offs + 8], sys.byteorder)
                if offs + 8 + size > len(plain):  # a corrupt count or length: gguf's reader raises here too
                    raise ValueError(f"a string of the array at byte {orig_offs} runs past the end of the file")
                offs += 8 + size
            parts.append(plain[orig_offs + 12 : offs])
            data.append(len(parts) - 1)
        elif item in self.gguf_scalar_to_np:
            values = self._get(offs, self.gguf_scalar_to_np[item], count[0])
            if len(values) != count[0]:
                raise ValueError(f"the array at byte {orig_offs} runs past the end of the file")
            parts.append(values)
            data.append(len(parts) - 1)
            offs += values.nbytes
        else:  # arrays of arrays
            return super()._get_field_parts(orig_offs, raw_type)
        return offs - orig_offs, parts, data, [GGUFValueType.ARRAY, item]


class GGUFFile:
    """One GGUF file opened for reading (memory-mapped; tensors are dequantized on demand)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # Nothing the reader made is kept: its parsed fields are about 80 MiB for a 49k vocabulary,
        # and any of its objects that stayed (its tensor records held 9 MiB) pinned memory around them.
        reader = self._open()
        if reader.byte_order == "S":
            raise ModelLoadError(f"{self.path} is in the other byte order from this machine's; not supported")
        self._map = reader.data
        self._tensors = [
            _Tensor(t.name, GGMLQuantizationType(t.tensor_type), tuple(reversed(t.shape.tolist())), t.data_offset, t.n_bytes)
            for t in reader.tensors
        ]
        self.tensor_names = {t.name for t in self._tensors}
        self.linear_types = {
            t.qtype for t in self._tensors
            if (m := _LAYER_RE.match(t.name)) and m.group(2) in _LINEAR_PARTS and m.group(3) == "weight"
        }
        # Arrays (the vocabulary) stay in the file until array() is asked for one, and are not kept: the
        # tokenizer's Python strings then live only while it is built, and no object kept is made among them
        # to hold their pymalloc arenas afterwards (SmolLM2's load: 2-3 MiB, docs/benchmarks.md).
        self.metadata: dict[str, Any] = {}
        self._arrays: dict[str, _Array | list] = {}
        for name, field in reader.fields.items():
            if field.types[:1] != [GGUFValueType.ARRAY]:
                self.metadata[name] = field.contents() if field.types else None
            elif len(field.types) == 2:  # strings or numbers: their count, then one view (_Reader._get_field_parts)
                data = field.data[0]
                self._arrays[name] = _Array(field.types[1], int(field.parts[data - 1][0]), field.parts[data])
            else:  # arrays of arrays, which nothing here reads: gguf's contents() (flattened numbers)
                self._arrays[name] = field.contents()
        self.array_names = sorted(self._arrays)
        self.architecture = str(self.metadata.get("general.architecture", ""))
        self._header_bytes = min((t.offset for t in self._tensors), default=0)
        _release(self._map, 0, self._header_bytes)  # the header's pages (8 MiB for SmolLM2's vocabulary) are parsed

    def array(self, name: str) -> list[Any] | None:
        """An array's items, read from the file now and not kept (a vocabulary is megabytes); None if absent."""
        found = self._arrays.get(name)
        if not isinstance(found, _Array):
            return None if found is None else list(found)
        try:
            items = _strings(found.data) if found.item == GGUFValueType.STRING else found.data.tolist()
        except UnicodeDecodeError as exc:
            raise ModelLoadError(f"GGUF file {self.path} is corrupt: {name} holds a string that is not UTF-8 "
                                 f"({exc})") from exc
        _release(self._map, 0, self._header_bytes)
        return items

    def array_length(self, name: str) -> int:
        """How many items an array has (0 if absent), without reading them."""
        found = self._arrays.get(name)
        return found.count if isinstance(found, _Array) else len(found or [])

    def _open(self) -> _Reader:
        # Files that are whole but that we cannot read say so, rather than be called corrupt (and fetched again).
        with open(self.path, "rb") as f:
            head = f.read(8)
        # Version 1 is the one old format; a version past 3 is likelier corruption than a format yet to come.
        if head == b"GGUF" + (1).to_bytes(4, "little"):
            raise ModelLoadError(f"GGUF file {self.path} is of version 1; supported: 2 and 3 (convert it again with "
                                 "a current llama.cpp)")
        # A file named otherwise without the magic is no GGUF at all, not a damaged one to delete (a .gguf one may be).
        if self.path.suffix != ".gguf" and len(head) == 8 and not head.startswith(b"GGUF"):
            raise ModelLoadError(f"{self.path} is not a GGUF file (it does not start with GGUF's magic); a Hugging "
                                 "Face model loads from its folder, the one holding config.json")
        try:
            return _Reader(self.path)
        except Exception as exc:  # the reader raises bare ValueError/IndexError on bad bytes
            if "GGMLQuantizationType" in str(exc):
                raise ModelLoadError(f"GGUF file {self.path} holds a tensor type newer than this install's gguf "
                                     f"package knows ({exc}); upgrade it: pip install -U gguf") from exc
            size = self.path.stat().st_size if self.path.is_file() else 0
            raise ModelLoadError(
                f"cannot read GGUF file {self.path} ({size:,} bytes): it is corrupt or truncated (an interrupted "
                f"copy?); delete it and fetch it again (`tokenmill pull NAME --force` for a catalog model). "
                f"The reader said: {exc}"
            ) from exc

    def native_quantization(self) -> str:
        """The weight-only quantization closest to how the file stores its linear layers.

        int4 for Q4_0 and Q4_1 (int4 groups of 32 hold their blocks exactly), int8 for any other quantized
        type (exact for Q5_0, Q5_1 and Q8_0, within an int8 step otherwise), none for float layers.
        """
        if self.linear_types <= _FLOAT_TYPES:
            return "none"
        return "int4" if self.linear_types <= {GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1} else "int8"

    def sampling_defaults(self) -> dict[str, float]:
        """The sampling settings the file recommends, for requests that leave them unset."""
        return {name: self.metadata[key] for key, name in _SAMPLING_KEYS.items() if key in self.metadata}

    def model_config(self) -> ModelConfig:
        """Build the ModelConfig from the `<arch>.*` metadata keys."""
        arch, md = self.architecture, self.metadata

        def key(name: str, default: Any = None, cast: type = int) -> Any:
            if f"{arch}.{name}" in self._arrays:  # llama.cpp's per-layer values (head counts, MLP widths)
                raise ModelLoadError(f"GGUF file {self.path} gives {arch}.{name} per layer; not supported")
            value = md.get(f"{arch}.{name}", default)
            if value is None:
                raise ModelLoadError(f"GGUF file {self.path} lacks metadata key {arch}.{name}")
            return self._number(f"{arch}.{name}", value, cast)

        num_heads, hidden, num_layers = key("attention.head_count"), key("embedding_length"), key("block_count")
        num_kv_heads, context = key("attention.head_count_kv", num_heads), key("context_length")
        # A file that breaks these would load and then fail in the first request's attention.
        if min(num_heads, num_kv_heads, hidden, num_layers, context) < 1 or num_heads % num_kv_heads:
            raise ModelLoadError(
                f"GGUF file {self.path} has {num_heads} attention heads, {num_kv_heads} key/value heads, width "
                f"{hidden}, {num_layers} layers and context {context}: each must be positive and the heads a "
                "multiple of the key/value heads")
        vocab = md.get(f"{arch}.vocab_size") or self.array_length("tokenizer.ggml.tokens")
        names = self.tensor_names
        eos = [self._number(k, md[k], int) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
               if k in md]
        rope_scaling = None
        legacy = md.get(f"{arch}.rope.scale_linear")  # where 2023's convert.py wrote a linear factor
        # A factor without a type is linear, as llama.cpp reads it: SuperHOT-style files carry the factor alone.
        has_factor = f"{arch}.rope.scaling.factor" in md or legacy is not None
        scaling = md.get(f"{arch}.rope.scaling.type", "linear" if has_factor else "none")
        if scaling == "linear":
            rope_scaling = {"rope_type": "linear", "factor": key("rope.scaling.factor", legacy, cast=float)}
        elif scaling != "none":  # YaRN, LongRoPE: without them the frequencies, and so every token, would differ
            raise ModelLoadError(f"GGUF file {self.path} uses {scaling!r} rope scaling; supported: linear")
        window = key("attention.sliding_window", 0)
        layer_types, local_theta, attention_scale = None, None, None
        if arch == "gemma3":
            layer_types = gemma3_layer_types(num_layers)
            local_theta = _GEMMA3_LOCAL_THETA
            if num_layers == _GEMMA3_27B_LAYERS:
                attention_scale = (hidden // num_heads) ** -0.5
        head_dim = key("attention.key_length", hidden // num_heads) or hidden // num_heads
        # Rotating fewer dimensions than a head has (partial rotary) is not implemented: every head would differ.
        if (rotated := key("rope.dimension_count", head_dim)) != head_dim:
            raise ModelLoadError(f"GGUF file {self.path} rotates {rotated} of each head's {head_dim} dimensions "
                                 f"({arch}.rope.dimension_count); partial rotary embeddings are not supported")
        num_experts = key("expert_count", 0)
        # Mixtral's experts are feed_forward_length wide; Qwen's have a width of their own.
        expert_width = key("expert_feed_forward_length") if num_experts and arch in _MOE_NORM_TOPK else 0
        return ModelConfig(
            architecture=arch,
            vocab_size=self._number(f"{arch}.vocab_size", vocab, int),
            hidden_size=hidden,
            intermediate_size=key("feed_forward_length"),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=key("attention.layer_norm_rms_epsilon", cast=float),
            rope_theta=key("rope.freq_base", 10000.0, cast=float),
            max_position_embeddings=context,
            tie_word_embeddings="output.weight" not in names,
            rope_scaling=rope_scaling,
            attention_bias="blk.0.attn_q.bias" in names,
            attention_out_bias="blk.0.attn_output.bias" in names,
            mlp_bias="blk.0.ffn_down.bias" in names,
            sliding_window=window or None,
            layer_types=layer_types,
            rope_local_theta=local_theta,
            attention_scale=attention_scale,
            # llama.cpp puts experts in every layer of these architectures: no dense layers to list.
            num_experts=num_experts,
            num_experts_per_tok=key("expert_used_count") if num_experts else 0,
            moe_intermediate_size=expert_width,
            shared_expert_intermediate_size=key("expert_shared_feed_forward_length", 0),
            norm_topk_prob=bool(md.get(f"{arch}.expert_weights_norm", _MOE_NORM_TOPK.get(arch, False))),
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=sorted(set(eos)),
        )

    def _number(self, name: str, value: Any, cast: type) -> Any:
        """A metadata value as an int or a float, or a load error naming the key (a string, 4.7 heads)."""
        try:
            number = cast(value)
        except (TypeError, ValueError):
            number = None
        if number is None or isinstance(value, (str, bytes)) or (cast is int and number != value):
            kind = "an integer" if cast is int else "a number"
            raise ModelLoadError(f"GGUF file {self.path} has {name} = {value!r}, not {kind}")
        return number

    def weights(
        self, config: ModelConfig, dtype: torch.dtype, levels: bool = False
    ) -> Iterator[tuple[str, slice, torch.Tensor | LevelRows]]:
        """Yield (Hugging Face name, rows, dequantized rows) for every tensor in the file, large ones in pieces.

        With levels, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 tensors (2-D, or each expert of a stack) come as the file's own
        levels, steps and offsets (LevelRows), for quantized layers to take unchanged (pieces of a centred type whose
        offsets float16 cannot hold come as floats).
        """
        data = self._map.view(np.ndarray)  # slicing np.memmap itself costs bookkeeping on every slice
        for tensor in self._tensors:
            # A tensor without a Hugging Face name keeps its own, for the model's load to reject by name.
            name = _hf_name(tensor.name, self.architecture, config.num_experts > 0) or tensor.name
            if "{}" in name:  # stacked experts
                yield from self._expert_weights(tensor, name, config, data, dtype, levels)
                continue
            offset = -1.0 if self.architecture in _NORM_OFFSET_ARCHITECTURES and name.endswith("norm.weight") else 0.0
            heads = None
            if self.architecture in _PERMUTED_ARCHITECTURES:
                if name.endswith(("q_proj.weight", "q_proj.bias")):
                    heads = config.num_heads
                elif name.endswith(("k_proj.weight", "k_proj.bias")):
                    heads = config.num_kv_heads
            try:
                if levels and tensor.qtype in _LEVEL_BITS and len(tensor.shape) == 2:
                    yield from ((name, rows, piece) for rows, piece in _levels(tensor, data, heads, dtype))
                    _release(self._map, 0, tensor.offset + tensor.n_bytes)
                    continue
                # The permutation moves rows within a head: those tensors come whole.
                for rows, array in _dequantized(tensor, data, whole=heads is not None):
                    array = _unpermute(array, heads) if heads else array
                    if name.endswith("shared_expert_gate.weight"):  # [hidden] from converters that squeezed it
                        array = array.reshape(1, -1)
                    # Llama 3.1's frequency factors are no weight: in bfloat16 they would move the rotations by 0.2%.
                    into = torch.float32 if name == "rope_freqs" else dtype
                    yield name, rows, torch.from_numpy(array + offset if offset else array).to(into)
                # From the file's start: a page fault maps its neighbours too, some before this tensor.
                _release(self._map, 0, tensor.offset + tensor.n_bytes)
            except NotImplementedError as exc:
                raise ModelLoadError(f"tensor {tensor.name} of {self.path} uses type {tensor.qtype.name}, which the "
                                     "gguf package cannot dequantize; use a file quantized to another type (such as "
                                     "Q4_K_M or Q8_0)") from exc
            except Exception as exc:
                raise ModelLoadError(f"cannot read tensor {tensor.name} from {self.path}: {exc}") from exc

    def _expert_weights(
        self, tensor: "_Tensor", name: str, config: ModelConfig, data: np.ndarray, dtype: torch.dtype, levels: bool
    ) -> Iterator[tuple[str, slice, torch.Tensor | LevelRows]]:
        """Each expert's projection out of a stacked [experts, rows, columns] tensor, one expert at a time (with
        levels, a _LEVEL_BITS type's as its own levels, as a 2-D tensor's)."""
        if len(tensor.shape) != 3 or tensor.shape[0] != config.num_experts:
            raise ModelLoadError(
                f"tensor {tensor.name} has shape {tensor.shape}; expected [{config.num_experts} experts, rows, "
                f"columns] ({self.architecture}.expert_count is {config.num_experts})"
            )
        # Experts lie one after another, each a whole number of quantization blocks per row: one expert is
        # a 2-D tensor of its own, dequantized in pieces, so the whole stack is never in float32 at once.
        expert_bytes = tensor.n_bytes // config.num_experts
        for expert in range(config.num_experts):
            offset = tensor.offset + expert * expert_bytes
            one = tensor._replace(shape=tensor.shape[1:], offset=offset, n_bytes=expert_bytes)
            try:
                if levels and tensor.qtype in _LEVEL_BITS:
                    yield from ((name.format(expert), rows, piece) for rows, piece in _levels(one, data, None, dtype))
                else:
                    for rows, array in _dequantized(one, data, whole=False):
                        yield name.format(expert), rows, torch.from_numpy(array).to(dtype)
            except NotImplementedError as exc:
                raise ModelLoadError(f"tensor {tensor.name} of {self.path} uses type {tensor.qtype.name}, which the "
                                     "gguf package cannot dequantize; use a file quantized to another type (such as "
                                     "Q4_K_M or Q8_0)") from exc
            except Exception as exc:
                raise ModelLoadError(f"cannot read tensor {tensor.name} from {self.path}: {exc}") from exc
            _release(self._map, 0, one.offset + one.n_bytes)


class _Array(NamedTuple):
    """An array field left in the file: its items' type and count, and their bytes as a view of the memory map."""

    item: GGUFValueType
    count: int
    data: np.ndarray  # the values, or each string's 8-byte length and UTF-8 bytes


def _strings(raw_array: np.ndarray) -> list[str]:
    """Decode a GGUF string array's items (each an 8-byte length, then that many UTF-8 bytes)."""
    raw, strings, offs = memoryview(raw_array), [], 0
    while offs < len(raw):
        size = int.from_bytes(raw[offs : offs + 8], sys.byteorder)
        strings.append(str(raw[offs + 8 : offs + 8 + size], "utf-8"))
        offs += 8 + size
    return strings


class _Tensor(NamedTuple):
    """Where one tensor lies in the file."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # outermost dimension first, as torch orders it
    offset: int
    n_bytes: int


def _dequantized(tensor: _Tensor, data: np.ndarray, whole: bool) -> Iterator[tuple[slice, np.ndarray]]:
    """The tensor as new float32 arrays (out of the read-only map): (rows, array) pieces of about 1 MiB.

    Whole-tensor dequantization held a 108 MiB float32 embedding on top of every weight already
    loaded: the load's peak. whole=True gives one piece, still filled 1 MiB of rows at a time.
    """
    shape = tensor.shape
    rows = data[tensor.offset : tensor.offset + tensor.n_bytes].reshape(math.prod(shape[:-1]), -1)  # bytes per row
    step = max(1, _DEQUANTIZE_ELEMENTS // shape[-1])
    if whole or len(shape) != 2:
        out = np.empty(shape, np.float32)
        flat = out.reshape(-1, shape[-1])
        for start in range(0, len(rows), step):
            flat[start : start + step] = dequantize(rows[start : start + step], tensor.qtype)
        yield slice(None), out
        return
    for start in range(0, len(rows), step):
        # np.array copies: float32 tensors dequantize to a view of the map, which _release drops.
        piece = np.array(dequantize(rows[start : start + step], tensor.qtype), np.float32)
        yield slice(start, start + len(piece)), piece


def _levels(tensor: _Tensor, data: np.ndarray, heads: int | None,
            dtype: torch.dtype) -> Iterator[tuple[slice, LevelRows | torch.Tensor]]:
    """A _LEVEL_BITS tensor's blocks as their levels, float16 steps and offsets: (rows, LevelRows) pieces, or
    (rows, weights) where the levels cannot say them.

    Q4_1 blocks are (d, m, 16 bytes): input j in byte j's low nibble, input 16 + j in its high one, w = d * q + m;
    Q4_0 blocks are (d, 16 bytes), w = d * (q - 8). Q5_1 and Q5_0 add 4 bytes after d (and m) whose bit j is the
    fifth bit of input j. Q8_0 blocks are (d, 32 int8): w = d * q, which is d * (q + 128) - 128 * d on unsigned
    levels. A centred type's offset -centre * d is exact in float16, unless it passes its range (Q8_0's d above
    511.75): such a piece comes as float weights of dtype instead.
    """
    block_bytes = GGML_QUANT_SIZES[tensor.qtype][1]
    rows = data[tensor.offset : tensor.offset + tensor.n_bytes].reshape(tensor.shape[0], -1, block_bytes)
    if heads:
        rows = _unpermute(rows, heads)
    step = max(1, _DEQUANTIZE_ELEMENTS // tensor.shape[1])
    for start in range(0, len(rows), step):
        blocks = rows[start : start + step]
        d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
        centre = _CENTRES.get(tensor.qtype)
        body = 2 if centre else 4  # after d, or after d and m
        if tensor.qtype == GGMLQuantizationType.Q8_0:
            level = blocks[..., 2:] ^ np.uint8(0x80)  # the int8 q's bits as q + 128
        else:
            fifth = _LEVEL_BITS[tensor.qtype] == 5
            nibbles = blocks[..., body + 4 * fifth:]
            level = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1)
            if fifth:
                high = np.ascontiguousarray(blocks[..., body : body + 4]).view("<u4")
                level |= (((high >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)
        if centre:
            with np.errstate(over="ignore"):
                offset = d * np.float16(-centre)
            if not np.isfinite(offset).all():
                weights = np.array(dequantize(blocks.reshape(len(blocks), -1), tensor.qtype), np.float32)
                yield slice(start, start + len(blocks)), torch.from_numpy(weights).to(dtype)
                continue
        else:
            offset = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
        levels = torch.from_numpy(level.reshape(len(blocks), -1))
        yield slice(start, start + len(blocks)), LevelRows(levels, torch.from_numpy(d), torch.from_numpy(offset),
                                                           _LEVEL_BITS[tensor.qtype])


def _release(file_map: np.memmap, start: int, stop: int) -> None:
    """Drop bytes [start, stop) of the file from this process once read: mapped pages count as resident
    until unmapped, and the whole file (98 MiB for SmolLM2) otherwise sat on top of the loaded weights."""
    mapping = getattr(file_map, "_mmap", None)  # np.memmap's own mmap object
    if mapping is None:
        return
    start = start // mmap.PAGESIZE * mmap.PAGESIZE
    mapping.madvise(mmap.MADV_DONTNEED, start, stop - start)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row interleave so rotary embedding uses the Hugging Face half-split."""
    # The converter turned each head's rows [half0 | half1] into pairs (h0[i], h1[i]).
    head_rows = w.shape[0] // n_heads
    return w.reshape(n_heads, head_rows // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str, architecture: str, moe: bool) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    names = {**_LAYER_NAMES, **_ARCH_LAYER_NAMES.get(architecture, {})}
    if moe:
        names |= {**_MOE_LAYER_NAMES, **_ARCH_MOE_LAYER_NAMES.get(architecture, {})}
    if match is None or match.group(2) not in names:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{names[part]}.{kind}"


