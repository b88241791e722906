"""The GGUF reader (gguf's own, reading arrays in one pass) gives the metadata gguf's unchanged reader gives."""

import gguf
import pytest

from tokenmill.errors import ModelLoadError
from tokenmill.loader.gguf import GGUFFile

ARRAYS = {
    "t.strings": ["", "a", "héllo wörld", "▁tok", "\n"],
    "t.floats": [0.5, -1.25, 3e-8],
    "t.ints": [1, -2, 3],
    "t.empty": [],
    "t.nested": [[1, 2], [3]],
}


def _write(writer: gguf.GGUFWriter) -> None:
    """Write the header, the metadata and no tensors, and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _expected(path) -> dict:
    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}


@pytest.fixture
def arrays_file(tmp_path):
    """A GGUF file of the ARRAYS, then a string and a number, and no tensors."""
    path = tmp_path / "arrays.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for key, values in ARRAYS.items():
        writer.add_array(key, values)
    writer.add_string("t.string", "after the arrays")
    writer.add_uint32("t.scalar", 7)
    _write(writer)
    return path


def _read(file: GGUFFile) -> dict:
    return {**file.metadata, **{name: file.array(name) for name in file.array_names}}


def test_arrays_of_every_kind_read_as_gguf_reads_them(arrays_file):
    file = GGUFFile(arrays_file)
    assert _read(file) == _expected(arrays_file)
    assert file.array("t.strings") == ARRAYS["t.strings"] and file.metadata["t.scalar"] == 7
    assert file.metadata["t.string"] == "after the arrays"  # the arrays' sizes put the next key where it is
    assert [file.array_length(name) for name in ARRAYS] == [5, 3, 3, 0, 3]  # gguf flattens nested arrays
    assert file.array("t.missing") is None and file.array_length("t.missing") == 0


def test_arrays_are_read_when_asked_for_and_not_kept(arrays_file):
    file = GGUFFile(arrays_file)
    assert not any(isinstance(value, list) for value in file.metadata.values())
    strings = file.array("t.strings")
    held = [*vars(file).values(), *(v for d in vars(file).values() if isinstance(d, dict) for v in d.values())]
    assert not any(isinstance(value, list) and value == strings for value in held)  # not before the call, nor cached
    for name in ("t.strings", "t.nested"):
        file.array(name).append("changed")  # a caller's list is its own
        assert file.array(name) == _expected(arrays_file)[name]


def test_smollm2_metadata_equals_gguf_s(smollm2_path, gguf_parsed_once):
    # gguf_parsed_once: the reference parse is shared with transformers' loads of the same file.
    file = GGUFFile(smollm2_path)
    assert _read(file) == _expected(smollm2_path)
    assert len(file.array("tokenizer.ggml.tokens")) == file.array_length("tokenizer.ggml.token_type") == 49152


@pytest.mark.parametrize("key", ["t.strings", "t.floats"])
def test_an_array_count_past_the_end_of_the_file_is_a_load_error(arrays_file, key):
    data = bytearray(arrays_file.read_bytes())
    count = data.index(key.encode()) + len(key) + 8  # past the key, its type and its items' type
    data[count : count + 8] = (2**40).to_bytes(8, "little")
    arrays_file.write_bytes(bytes(data))
    # An error at once: reading 2^40 strings from past the end would not end.
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        GGUFFile(arrays_file)


def test_a_hyperparameter_given_per_layer_is_a_load_error_naming_it(tmp_path):
    path = tmp_path / "per_layer.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_array("llama.attention.head_count", [4, 4, 8])  # llama.cpp reads such arrays as one value a layer
    _write(writer)
    with pytest.raises(ModelLoadError, match="llama.attention.head_count per layer"):
        GGUFFile(path).model_config()


def _attention(writer: gguf.GGUFWriter, heads: int = 4, kv_heads: int = 4) -> None:
    """The size keys every model has, for a file that tests the others."""
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_context_length(128)


@pytest.mark.parametrize("change, message", [
    (lambda w: (_attention(w, heads=4, kv_heads=3)), "multiple of the key/value heads"),
    (lambda w: (_attention(w, heads=0, kv_heads=1)), "must be positive"),
    (lambda w: (_attention(w), w.add_string("llama.feed_forward_length", "big")),
     "llama.feed_forward_length = 'big', not an integer"),
    (lambda w: (_attention(w), w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)),
     "lacks metadata key llama.rope.scaling.factor"),
    (lambda w: (_attention(w), w.add_float32("llama.attention.sliding_window", 4.5)),
     "llama.attention.sliding_window = 4.5, not an integer"),
])
def test_malformed_hyperparameters_are_load_errors_naming_them(tmp_path, change, message):
    # Before: tracebacks (ValueError, ZeroDivisionError, KeyError), or a model that failed in its first request.
    path = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    change(writer)
    if "feed_forward" not in message:
        writer.add_feed_forward_length(128)
    writer.add_layer_norm_rms_eps(1e-6)
    _write(writer)
    with pytest.raises(ModelLoadError, match=message):
        GGUFFile(path).model_config()


def test_rope_scaling_tokenmill_lacks_is_a_load_error_not_ignored(tmp_path):
    path = tmp_path / "yarn.gguf"
    writer = gguf.GGUFWriter(path, "qwen2")
    _attention(writer)
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    _write(writer)
    with pytest.raises(ModelLoadError, match="'yarn' rope scaling; supported: linear"):
        GGUFFile(path).model_config()


@pytest.mark.parametrize("layers, hidden, heads, scale", [(62, 5376, 32, 168 ** -0.5), (18, 640, 4, None)])
def test_gemma3_27b_scales_attention_by_hidden_over_heads_as_llama_cpp(tmp_path, layers, hidden, heads, scale):
    # 27B's query_pre_attn_scalar (168) is not its head_dim (128); for 270M to 12B the scale is head_dim's.
    path = tmp_path / "gemma3.gguf"
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_block_count(layers)
    writer.add_embedding_length(hidden)
    writer.add_head_count(heads)
    writer.add_key_length(128 if layers == 62 else 256)
    writer.add_feed_forward_length(4 * hidden)
    writer.add_context_length(8192)
    writer.add_layer_norm_rms_eps(1e-6)
    _write(writer)
    assert GGUFFile(path).model_config().attention_scale == scale


def test_a_string_that_is_not_utf8_is_a_load_error_naming_its_array(arrays_file):
    data = bytearray(arrays_file.read_bytes())
    at = data.index("héllo".encode())
    data[at + 1] = 0xFF  # the first byte of "é" made invalid
    arrays_file.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="corrupt: t.strings holds a string that is not UTF-8"):
        GGUFFile(arrays_file).array("t.strings")
