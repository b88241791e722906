"""What `serve --model` loads: MODEL or NAME=MODEL specs, one engine each, with an even share of the KV budget."""

import threading
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

from tokenmill.config import EngineConfig
from tokenmill.embeddings.model import EmbeddingModel, is_embedding_model
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import RequestOutput
from tokenmill.router.policies import AUTO

# The pool an engine gets on CPU when kv_cache_memory is unset (EngineConfig, engine/kv_cache.py): the
# total that several served models share.
_CPU_KV_CACHE_GIB = 1.0


@dataclass
class ModelSpec:
    """One --model value: the model to load and the name to serve it as (None: the model's own name)."""

    model: str
    name: str | None = None

    @classmethod
    def parse(cls, value: str) -> "ModelSpec":
        """`MODEL` or `NAME=MODEL`; raises InvalidRequestError when a side of the `=` is empty."""
        name, sep, model = value.partition("=")
        if not sep or Path(value).expanduser().exists():  # a file or folder whose own name holds a `=`
            return cls(value)
        if not name or not model:
            raise InvalidRequestError(f"--model {value!r} has an empty side; give MODEL or NAME=MODEL")
        return cls(model, name)


def _total_kv_gib(config: EngineConfig) -> float | None:
    """The KV budget in GiB the models share, or None where each sizes its pool from free GPU memory."""
    if config.kv_cache_memory is None and config.device.split(":")[0] == "cuda":
        return None
    return config.kv_cache_memory or _CPU_KV_CACHE_GIB


def kv_shares(config: EngineConfig, n: int) -> list[EngineConfig]:
    """n copies of config, each with an even share of the KV budget config describes."""
    total = _total_kv_gib(config)
    if total is not None:
        return [replace(config, kv_cache_memory=total / n) for _ in range(n)]
    # Engines load one after another and each takes its fraction of the GPU memory still free, which the
    # pools before it have shrunk: the i-th taking share / (1 - i * share) of that gives each `share` of
    # what was free at the start (less what later weights take).
    share = config.kv_cache_fraction / n
    return [replace(config, kv_cache_fraction=share / (1 - i * share)) for i in range(n)]


def describe_kv_split(config: EngineConfig, n: int) -> str:
    """How n models share the KV budget, for the start-up log."""
    total = _total_kv_gib(config)
    if total is not None:
        return (f"KV cache: {total:g} GiB in all (--kv-cache-memory, default 1 on CPU), split evenly: "
                f"{total / n:g} GiB for each of {n} models")
    return (f"KV cache: {config.kv_cache_fraction:g} of free GPU memory in all (--kv-cache-fraction), split "
            f"evenly: {config.kv_cache_fraction / n:g} of it for each of {n} models")


class _Turns:
    """A lock granted in the order it was asked for, so that a busy engine cannot keep another from stepping."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._changed:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._changed.wait_for(lambda: self._serving == ticket)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        with self._changed:
            self._serving += 1
            self._changed.notify_all()


# Overlapping forwards would fight over the same cores: each engine thread's torch ops spread over every
# core, and two at once oversubscribe them (spinning threads then wait on descheduled ones). Generative steps
# and embedding passes (embeddings/engine.py) all take this one lock in turn.
turns = _Turns()


class TurnTakingEngine(LLMEngine):
    """An LLMEngine whose steps never overlap another's in this process: under load, the engines alternate."""

    _turns = turns

    def step(self) -> list[RequestOutput]:
        """One engine step, once no other engine is in the middle of one."""
        with self._turns:
            return super().step()


def split_specs(specs: list[ModelSpec]) -> tuple[list[ModelSpec], list[ModelSpec]]:
    """The generative specs and the embedding ones (embeddings/model.py's is_embedding_model), each in order.

    A NAME given twice is refused here, before any model loads; names models take for their own are checked as
    they load.
    """
    names = [spec.name for spec in specs if spec.name is not None]
    if len(set(names)) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise InvalidRequestError(f"two models would be served as {twice!r}; name them apart with --model NAME=MODEL")
    embedding = [spec for spec in specs if is_embedding_model(spec.model)]
    return [spec for spec in specs if spec not in embedding], embedding


def load_embedding_models(specs: list[ModelSpec], dtype: str, taken: set[str]) -> dict[str, EmbeddingModel]:
    """One embedding model per spec by served name; raises InvalidRequestError on a name in taken or repeated."""
    models: dict[str, EmbeddingModel] = {}
    for spec in specs:
        model = EmbeddingModel.load(spec.model, dtype)
        name = spec.name or model.name
        if name in models or name in taken:
            raise InvalidRequestError(f"two models would be served as {name!r}; name them apart with "
                                      f"--model NAME=MODEL")
        if name == AUTO:  # /v1/models would list it twice, and `auto` route chats to an embedding model
            raise InvalidRequestError(f"{AUTO!r} names the router's choice among the generative models; give the "
                                      "embedding model another name")
        models[name] = model
    return models


def load_engines(config: EngineConfig, specs: list[ModelSpec]) -> dict[str, LLMEngine]:
    """One engine per spec, loaded in order, by served name; raises InvalidRequestError on a repeated name."""
    engines: dict[str, LLMEngine] = {}
    for spec, share in zip(specs, kv_shares(config, len(specs))):
        engine = TurnTakingEngine(replace(share, model=spec.model))
        name = spec.name or engine.source.name
        if name in engines:
            raise InvalidRequestError(f"two models would be served as {name!r}; name them apart with "
                                      f"--model NAME=MODEL")
        engines[name] = engine
    return engines
