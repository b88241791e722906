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
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_arrays_of_every_kind_read_as_gguf_reads_them(arrays_file):
    metadata = GGUFFile(arrays_file).metadata
    assert metadata == _expected(arrays_file)
    assert metadata["t.strings"] == ARRAYS["t.strings"] and metadata["t.scalar"] == 7
    assert metadata["t.string"] == "after the arrays"  # the arrays' sizes put the next key where it is


def test_smollm2_metadata_equals_gguf_s(smollm2_path, gguf_parsed_once):
    # gguf_parsed_once: the reference parse is shared with transformers' loads of the same file.
    metadata = GGUFFile(smollm2_path).metadata
    assert metadata == _expected(smollm2_path)
    assert len(metadata["tokenizer.ggml.tokens"]) == len(metadata["tokenizer.ggml.token_type"]) == 49152


@pytest.mark.parametrize("key", ["t.strings", "t.floats"])
def test_an_array_count_past_the_end_of_the_file_is_a_load_error(arrays_file, key):
    data = bytearray(arrays_file.read_bytes())
    count = data.index(key.encode()) + len(key) + 8  # past the key, its type and its items' type
    data[count : count + 8] = (2**40).to_bytes(8, "little")
    arrays_file.write_bytes(bytes(data))
    # An error at once: reading 2^40 strings from past the end would not end.
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        GGUFFile(arrays_file)
