"""Per-step inputs of the ZipAR attention mask (ZIPAR.md §3), built once per step and shared by all layers.

Key j of a request is visible to its query i iff raster(j) <= raster(i), step(j) <= step(i) and j is not a
proxy (unless j is i). The KV cache holds keys in feed order; `ImageKeyMetadata` remembers, per request,
the raster position, feed step and proxy flag of every cached token. A request whose tokens so far are in
strictly increasing raster order with no proxy (prefill, NTP, LlamaGen's row 0) is plain causal attention:
it stays on the platform's own kernel, and only the other requests are recomputed with the mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


class ImageKeyMetadata:
    """Raster position, feed step and proxy flag of each token in one request's KV sequence."""

    def __init__(self) -> None:
        self.positions = np.zeros(0, dtype=np.int64)
        self.steps = np.zeros(0, dtype=np.int64)
        self.proxy = np.zeros(0, dtype=bool)
        self.length = 0

    def write(self, start: int, positions: list[int], steps: list[int], proxy: list[bool]) -> None:
        """Record tokens `[start, start + n)`; anything after `start` is dropped (recompute, trimming)."""
        end = start + len(positions)
        if len(self.positions) < end:
            grow = max(end, 2 * len(self.positions))
            self.positions = np.resize(self.positions, grow)
            self.steps = np.resize(self.steps, grow)
            self.proxy = np.resize(self.proxy, grow)
        self.positions[start:end] = positions
        self.steps[start:end] = steps
        self.proxy[start:end] = proxy
        self.length = end

    def is_causal(self, length: int) -> bool:
        positions = self.positions[:length]
        return not self.proxy[:length].any() and bool(np.all(positions[1:] > positions[:-1]))

    def mask(self, first_query: int, num_queries: int) -> np.ndarray:
        """Boolean [num_queries, first_query + num_queries]: which keys each scheduled query may see."""
        length = first_query + num_queries
        q = slice(first_query, length)
        visible = (self.positions[None, :length] <= self.positions[q, None]) & (
            self.steps[None, :length] <= self.steps[q, None]
        )
        visible &= ~self.proxy[None, :length]
        rows = np.arange(num_queries)
        visible[rows, first_query + rows] = True
        return visible


@dataclass
class MaskedRequest:
    batch_index: int
    req_id: str
    query_start: int  # first row of this request's queries in the flattened batch
    num_queries: int
    seq_len: int
    mask: np.ndarray  # [num_queries, seq_len]


@dataclass
class ZipARAttentionInputs:
    """The requests of one step that need the ZipAR mask, with their masks and query rows."""

    requests: list[MaskedRequest] = field(default_factory=list)
    _tensors: dict = field(default_factory=dict)

    def add(
        self, batch_index: int, req_id: str, query_start: int, first_token: int, count: int,
        keys: ImageKeyMetadata,
    ) -> None:
        seq_len = first_token + count
        if keys.is_causal(seq_len):
            return
        self.requests.append(
            MaskedRequest(batch_index, req_id, query_start, count, seq_len, keys.mask(first_token, count))
        )

    def tensors(self, block_size: int, block_table: torch.Tensor) -> dict[str, torch.Tensor]:
        """Padded index and mask tensors for one batched masked attention (built once, reused per layer)."""
        if "mask" in self._tensors:
            return self._tensors
        num = len(self.requests)
        max_q = max(r.num_queries for r in self.requests)
        max_blocks = max((r.seq_len + block_size - 1) // block_size for r in self.requests)
        max_keys = max_blocks * block_size
        mask = torch.zeros(num, max_q, max_keys, dtype=torch.bool)
        query_rows = torch.zeros(num, max_q, dtype=torch.long)
        query_valid = torch.zeros(num, max_q, dtype=torch.bool)
        blocks = torch.zeros(num, max_blocks, dtype=torch.long)
        for i, r in enumerate(self.requests):
            mask[i, : r.num_queries, : r.seq_len] = torch.from_numpy(r.mask)
            mask[i, r.num_queries :, 0] = True  # padded query rows: anything finite, never written back
            query_rows[i, : r.num_queries] = torch.arange(r.query_start, r.query_start + r.num_queries)
            query_valid[i, : r.num_queries] = True
            used = (r.seq_len + block_size - 1) // block_size
            blocks[i, :used] = block_table[r.batch_index, :used].to(torch.long)
        self._tensors = {
            "mask": mask, "query_rows": query_rows, "query_valid": query_valid, "blocks": blocks,
        }
        return self._tensors
