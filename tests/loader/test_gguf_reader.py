"""The GGUF reader (gguf's own, reading arrays in one pass) gives the metadata gguf's unchanged reader gives."""

import gguf

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


def test_arrays_of_every_kind_read_as_gguf_reads_them(tmp_path):
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
    metadata = GGUFFile(path).metadata
    assert metadata == _expected(path)
    assert metadata["t.strings"] == ARRAYS["t.strings"] and metadata["t.scalar"] == 7
    assert metadata["t.string"] == "after the arrays"  # the arrays' sizes put the next key where it is


def test_smollm2_metadata_equals_gguf_s(smollm2_path, gguf_parsed_once):
    # gguf_parsed_once: the reference parse is shared with transformers' loads of the same file.
    metadata = GGUFFile(smollm2_path).metadata
    assert metadata == _expected(smollm2_path)
    assert len(metadata["tokenizer.ggml.tokens"]) == len(metadata["tokenizer.ggml.token_type"]) == 49152
