"""Shared fixtures: the real default model (pulled once into $TOKENMILL_HOME) and tiny random models."""

import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # NOTE: Triton's library functions (tl.max, tl.sum) are built for its interpreter only if this is set
    # before triton is first imported, which transformers' tests may do before the Triton kernel's test.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import oracles  # noqa: E402
from tokenmill.loader import catalog  # noqa: E402

# Test files whose compiler runs or transformers loads take tens of seconds of CPU: each also runs as a script, which
# does that work and prints what its tests need as JSON.
_TESTS = Path(__file__).parent
_EARLY = (_TESTS / "layers" / "test_cpu_builds.py", _TESTS / "loader" / "test_tokenizer.py",
          _TESTS / "models" / "test_gemma3.py", _TESTS / "test_ops_sources.py")
_CHILDREN = pytest.StashKey[dict]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the _EARLY files last, so that their children have the whole suite's idle CPU to finish in."""
    items.sort(key=lambda item: item.path in _EARLY)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start each _EARLY file whose tests are to run as a script in a child, at the lowest CPU priority.

    Their compiles take about 170 s of CPU and the transformers loads about 60, and the suite leaves about 40% of two
    cores idle (158% CPU use over the whole suite): started now, they are done by the time their tests, the suite's
    last, ask for the results. The children import tests/oracles.py, as the tests do.
    """
    if session.config.option.collectonly:  # nothing will ask; pytest_sessionfinish would wait for them all the same
        return
    wanted = {item.path for item in session.items if "early_output" in item.fixturenames}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_TESTS), os.environ.get("PYTHONPATH")]))}
    children = {}
    for path in _EARLY:
        if path not in wanted:
            continue
        # stderr to a file: a pipe no one reads until the end could fill and stall the child.
        errors = tempfile.TemporaryFile()
        script = "import os, runpy, sys; os.nice(19); runpy.run_path(sys.argv[1], run_name='__main__')"
        child = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, stderr=errors,
                                 text=True, env=env)
        children[path] = (child, errors)
    session.stash[_CHILDREN] = children


@pytest.fixture(scope="session")
def early_output(request):
    """What an _EARLY file printed as a script, by the file's path; waits for it to finish."""
    outputs = {}

    def output(path: Path):
        if path not in outputs:
            child, errors = request.session.stash[_CHILDREN][path]
            stdout, _ = child.communicate()
            if child.returncode != 0:
                errors.seek(0)
                pytest.fail(f"{path.name} as a script failed:\n{errors.read().decode()}")
            outputs[path] = json.loads(stdout)
        return outputs[path]

    return output


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Wait for the children: one killed mid-build would leave torch's build lock, on which the next load waits forever."""
    for child, errors in session.stash.get(_CHILDREN, {}).values():
        if child.returncode is None:  # no test asked for its output
            child.communicate()
        errors.close()


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
def gguf_parsed_once():
    """transformers' GGUF loads sharing their work for the session (oracles.share_gguf_work)."""
    patch = pytest.MonkeyPatch()
    oracles.share_gguf_work(patch)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path: Path, gguf_parsed_once):
    """Hugging Face transformers' own load of the same GGUF: the reference implementation."""
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
def run_prompts(drain):
    """Run prompts through an engine as requests "0", "1", ... to the end; each one's output token ids.

    Asserts that every KV block is back in the pool after.
    """

    def run(engine, prompts: list, params) -> list[list[int]]:
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        finals = drain(engine)
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # nothing leaked
        return [finals[str(i)].outputs[0].token_ids for i in range(len(prompts))]

    return run


@pytest.fixture(scope="session")
def last_logits():
    """The logits at a prompt's last position, from one whole prefill through an engine's model runner."""
    from tokenmill.sampling import SamplingParams

    def run(engine, token_ids: list[int]) -> torch.Tensor:
        engine.add_request("last-logits", token_ids, SamplingParams(temperature=0, max_tokens=1))
        logits = engine.runner.execute(engine.scheduler.schedule().scheduled).logits
        engine.abort("last-logits")
        return logits[0]

    return run


@pytest.fixture(scope="session")
def make_engine(smollm2_source):
    """Build an LLMEngine on the real SmolLM2 weights with the given EngineConfig options."""
    from tokenmill.config import EngineConfig
    from tokenmill.engine.llm_engine import LLMEngine

    def make(**options):
        return LLMEngine(EngineConfig(model=str(smollm2_source.path), **options), smollm2_source)

    return make
