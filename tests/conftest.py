"""Shared fixtures: the real default model (pulled once into $TOKENMILL_HOME) and tiny random models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # NOTE: Triton's library functions (tl.max, tl.sum) are built for its interpreter only if this is set
    # before triton is first imported, which transformers' tests may do before the Triton kernel's test.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tokenmill.loader import catalog  # noqa: E402


class TiedLM(torch.nn.Module):
    """A tiny LM whose head shares the embedding's weight, as SmolLM2's does: rewrites must keep the tie."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(96, 64)
        self.proj = torch.nn.Linear(64, 64)
        self.lm_head = torch.nn.Linear(64, 96, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.proj(self.embed_tokens(ids)))


@pytest.fixture
def tied_lm() -> TiedLM:
    """A fresh TiedLM with seeded random weights."""
    torch.manual_seed(0)
    return TiedLM()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M GGUF, pulled through the catalog if the cache lacks it."""
    return catalog.pull("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_source(smollm2_path: Path):
    """The opened SmolLM2 model source (config, tokenizer, weight stream)."""
    from tokenmill.loader.source import open_model

    return open_model(str(smollm2_path))


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path: Path):
    """Hugging Face transformers' own load of the same GGUF: the reference implementation."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def drain():
    """Step an engine until no request is left; each request's whole output, accumulated from the deltas."""
    from tokenmill.outputs import accumulate

    def run(engine) -> dict:
        finals = {}
        while engine.has_unfinished():
            for out in engine.step():
                finals[out.request_id] = accumulate(finals.get(out.request_id), out)
        return finals

    return run


@pytest.fixture(scope="session")
def make_engine(smollm2_source):
    """Build an LLMEngine on the real SmolLM2 weights with the given EngineConfig options."""
    from tokenmill.config import EngineConfig
    from tokenmill.engine.llm_engine import LLMEngine

    def make(**options):
        return LLMEngine(EngineConfig(model=str(smollm2_source.path), **options), smollm2_source)

    return make
