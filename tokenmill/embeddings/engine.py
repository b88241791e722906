"""The embedding engine: one thread owns the model and runs the batches the Batcher forms from queued inputs."""

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from tokenmill.embeddings.batcher import Batcher, BatchPolicy, Pending
from tokenmill.embeddings.model import EmbeddingModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchStats:
    """What one forward pass did, for the metrics: inputs, real and padded tokens, each input's queue wait."""

    num_inputs: int
    num_tokens: int
    padded_tokens: int
    queue_seconds: list[float]
    run_seconds: float


class EmbeddingEngine:
    """Queue token id lists from any thread or coroutine; a background thread embeds them in dynamic batches."""

    def __init__(self, model: EmbeddingModel, policy: BatchPolicy,
                 turns: AbstractContextManager | None = None,
                 on_batch: Callable[[BatchStats], None] | None = None) -> None:
        self.model = model
        self._batcher: Batcher[tuple[list[int], Future]] = Batcher(policy)
        self._changed = threading.Condition()
        # Held around each forward pass: the server passes the generative engines' turn lock, so that the two
        # kinds of model never compete for the same cores.
        self._turns = turns or contextlib.nullcontext()
        self._on_batch = on_batch
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Requests, and their input tokens, that the server has taken and not yet answered (its admission counts;
        # changed on the event loop only).
        self.num_waiting = 0
        self.num_waiting_tokens = 0

    @property
    def is_running(self) -> bool:
        """True while the engine thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the engine thread."""
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"embed-{self.model.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish what is queued, then end the thread."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, inputs: list[list[int]]) -> list[Future]:
        """Queue inputs; each future resolves to its embedding, a float32 tensor [dimensions]."""
        futures: list[Future] = [Future() for _ in inputs]
        now = time.perf_counter()
        with self._changed:
            for ids, future in zip(inputs, futures):
                self._batcher.add((ids, future), len(ids), now)
            self._changed.notify()
        return futures

    async def embed(self, inputs: list[list[int]]) -> torch.Tensor:
        """Embeddings of the inputs, [len(inputs), dimensions], once the batches holding them have run."""
        rows = await asyncio.gather(*(asyncio.wrap_future(f) for f in self.submit(inputs)))
        return torch.stack(rows)

    def _loop(self) -> None:
        while True:
            with self._changed:
                while (wait := self._batcher.wait_time(time.perf_counter())) != 0:
                    if self._stopping and wait is None:
                        return
                    # NOTE: a stop still lets the queue drain: the wait limit runs out and the batch is taken.
                    self._changed.wait(wait)
                batches = self._batcher.take()
            for batch in batches:
                self._run(batch)

    def _run(self, batch: list[Pending[tuple[list[int], Future]]]) -> None:
        # Inputs whose caller gave up (a client that went away) are dropped; the rest can no longer be cancelled.
        batch = [p for p in batch if p.item[1].set_running_or_notify_cancel()]
        if not batch:
            return
        inputs = [p.item[0] for p in batch]
        try:
            with self._turns:
                start = time.perf_counter()  # after the wait for the turn: that is queueing, and another's busy time
                embeddings = self.model.embed(inputs)
        except Exception as exc:  # a bug or an out-of-memory: the callers get it, the thread keeps serving
            logger.exception("embedding batch of %d inputs failed", len(batch))
            for p in batch:
                p.item[1].set_exception(exc)
            return
        done = time.perf_counter()
        for p, row in zip(batch, embeddings):
            p.item[1].set_result(row)
        if self._on_batch is not None:
            longest = max(len(ids) for ids in inputs)
            self._on_batch(BatchStats(len(batch), sum(map(len, inputs)), longest * len(batch),
                                      [start - p.arrival for p in batch], done - start))
