"""Decode steps as CUDA graphs: captured once per batch size at start-up, replayed with the batch padded up to one."""

import dataclasses
from collections.abc import Callable

import torch

from tokenmill.layers.attention import AttentionMetadata, attention_metadata

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Decode batch sizes captured at start-up, as vLLM's: each graph holds its own activations, so not every size.
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    """Static input buffers and one graph per batch size; a decode-only batch runs by copying in and replaying.

    A small model's decode step is bound by kernel launches, not by bandwidth: a replay launches the whole step at
    once. Without CUDA (`capture=False`) the same padded static forward runs eagerly, which is how the CPU tests
    check the padding.
    """

    def __init__(self, forward: Forward, batch_sizes: list[int], max_blocks: int, block_size: int,
                 device: torch.device, capture: bool) -> None:
        self.forward = forward
        self.device = device
        self.batch_sizes = sorted(batch_sizes)
        self.max_blocks = max_blocks
        largest = self.batch_sizes[-1]
        # Zeros are a valid step: position 0 over block 0, whose slot a real token overwrites before anyone reads it.
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.metadata = AttentionMetadata(
            slot_mapping=torch.zeros(largest, dtype=torch.long, device=device),
            row_tables=torch.zeros(largest, max_blocks, dtype=torch.long, device=device),
            row_lens=torch.ones(largest, dtype=torch.long, device=device),
            block_size=block_size, num_decodes=largest, prefills=[],
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture()

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor | None:
        """Hidden states of a decode-only batch, or None when no captured size or table width fits it."""
        n, width = input_ids.shape[0], metadata.row_tables.shape[1]
        size = next((b for b in self.batch_sizes if b >= n), None)
        if size is None or width > self.max_blocks or metadata.prefills or metadata.sliding is not None:
            return None
        # NOTE: padding rows repeat the last real row (its token, position, slot and table): they compute the same
        # key and value and write it to the same slot, so no block of anyone else's is touched.
        _fill(self.input_ids, input_ids, size)
        _fill(self.positions, positions, size)
        _fill(self.metadata.slot_mapping, metadata.slot_mapping, size)
        _fill(self.metadata.row_lens, metadata.row_lens, size)
        # Table columns past `width` keep older values: no row reads past its length, so none reads them.
        _fill(self.metadata.row_tables[:, :width], metadata.row_tables, size)
        if self.graphs:
            with torch.cuda.device(self.device):  # graphs capture and replay on the current device's streams
                self.graphs[size].replay()
            return self.outputs[size][:n]
        return self._forward(size)[:n]

    def _forward(self, size: int) -> torch.Tensor:
        meta = dataclasses.replace(self.metadata, slot_mapping=self.metadata.slot_mapping[:size],
                                   row_tables=self.metadata.row_tables[:size], row_lens=self.metadata.row_lens[:size],
                                   num_decodes=size)
        with attention_metadata(meta):
            return self.forward(self.input_ids[:size], self.positions[:size])

    def _capture(self) -> None:
        pool = None
        # Largest first, so the smaller graphs reuse its memory pool. On the engine's device, which need not be the
        # current one (cuda:1).
        with torch.cuda.device(self.device):
            for size in reversed(self.batch_sizes):
                self._forward(size)  # warm-up: lazy initialisation and autotuning must not happen inside a capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = self._forward(size)
                pool = graph.pool()
                self.graphs[size] = graph


def _fill(buffer: torch.Tensor, values: torch.Tensor, size: int) -> None:
    """Copy values into the first rows of buffer, and its last row into the rows after them, up to size."""
    n = values.shape[0]
    buffer[:n].copy_(values)
    buffer[n:size].copy_(values[n - 1 : n].expand(size - n, *values.shape[1:]))
