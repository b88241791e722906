"""An embedding model: a BERT encoder, its tokenizer, input limit and pooling, from a catalog name or a folder."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from tokenmill.embeddings.pooling import Pooling
from tokenmill.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError
from tokenmill.layers.packed_linear import can_pack
from tokenmill.loader import catalog
from tokenmill.loader.json_file import read_json_object
from tokenmill.models.bert import BertConfig, BertModel

# The dtypes an embedding model's linear layers may run in; `auto` picks one for this CPU.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def linear_dtype(name: str) -> torch.dtype:
    """The dtype for a name in DTYPES or `auto`: bfloat16 where the CPU multiplies it natively, else float32."""
    if name != "auto":
        if name not in DTYPES:
            raise InvalidRequestError(f"embedding dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    # Where oneDNN multiplies bfloat16 natively, bfloat16 linears embed 2.5x faster than float32 at cosine
    # >= 0.99997 to them (docs/benchmarks.md); elsewhere bfloat16 matmuls are emulated, slower than float32.
    return torch.bfloat16 if can_pack(torch.device("cpu"), torch.bfloat16) else torch.float32


def is_embedding_model(name_or_path: str) -> bool:
    """True for a catalog entry of kind `embed` or a folder holding a BERT config.json; reads no weights."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        try:
            return read_json_object(path / "config.json").get("model_type") == "bert"
        except ModelLoadError:  # the generative loader then says what is wrong with it
            return False
    entry = catalog.CATALOG.get(name_or_path)
    return entry is not None and entry.kind == "embed"


@dataclass
class EmbeddingModel:
    """Everything one forward pass needs; `embed` runs one padded batch of token id lists."""

    name: str
    encoder: BertModel
    tokenizer: Tokenizer  # with its own truncation and padding switched off: limits are checked per request
    pooling: Pooling
    max_input_tokens: int
    num_special_tokens: int  # what the tokenizer adds around each text ([CLS] and [SEP] for BERT)

    @classmethod
    def load(cls, name_or_path: str, dtype: str = "auto") -> "EmbeddingModel":
        """Open a catalog name (pulling it if needed) or a sentence-transformers / Hugging Face BERT folder.

        dtype (a DTYPES name or auto) is that of the linear layers; the rest of the model stays float32.
        """
        linears = linear_dtype(dtype)  # a bad name fails before the load
        path = Path(name_or_path).expanduser()
        name = path.name
        if not path.is_dir():
            catalog.entry_for(name_or_path)  # raises listing the known names
            path, name = catalog.pull(name_or_path), name_or_path
        if not is_embedding_model(str(path)):
            raise ModelNotFoundError(f"{path} is not an embedding model (a folder with a BERT config.json)")
        config = BertConfig.from_dir(path)
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            raise ModelLoadError(f"{path} has no *.safetensors weights")
        tensors: dict[str, torch.Tensor] = {}
        for file in weights:
            tensors.update(load_file(file))
        encoder = BertModel(config)
        encoder.load_hf_weights(tensors)
        encoder.set_linear_dtype(linears)
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return cls(name, encoder.eval(), tokenizer, Pooling.from_dir(path), _max_input_tokens(path, config),
                   tokenizer.num_special_tokens_to_add(is_pair=False))

    @property
    def dimensions(self) -> int:
        """Length of one embedding."""
        return self.encoder.config.hidden_size * len(self.pooling.modes)

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to this, exclusive."""
        return self.encoder.config.vocab_size

    def tokenize(self, texts: list[str], limit: int | None = None) -> list[list[int]]:
        """Token ids of each text with the special tokens; with a limit, the text is cut so that the whole fits it."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        if limit is not None:
            for encoding in encodings:
                encoding.truncate(max(limit - self.num_special_tokens, 0))
        return [self.tokenizer.post_process(encoding).ids for encoding in encodings]

    @torch.inference_mode()
    def embed(self, inputs: list[list[int]]) -> torch.Tensor:
        """One forward pass over the inputs, right-padded to the longest: [len(inputs), dimensions] float32."""
        longest = max(len(ids) for ids in inputs)
        if longest > self.max_input_tokens:
            raise InvalidRequestError(f"an input is {longest} tokens; this model's limit is {self.max_input_tokens}")
        input_ids = torch.zeros(len(inputs), longest, dtype=torch.long)
        mask = torch.zeros(len(inputs), longest, dtype=torch.bool)
        for row, ids in enumerate(inputs):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = True
        return self.pooling(self.encoder(input_ids, mask), mask).float()


def _max_input_tokens(path: Path, config: BertConfig) -> int:
    """sentence-transformers' max_seq_length (what the model was trained to), else the position table's size."""
    try:
        limit = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
    except (OSError, ValueError, KeyError, TypeError):  # none, or not the object sentence-transformers writes
        return config.max_position_embeddings
    return min(int(limit), config.max_position_embeddings)
