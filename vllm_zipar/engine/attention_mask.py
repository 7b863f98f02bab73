"""Per-step inputs of the ZipAR attention mask (ZIPAR.md §3), built once per step and shared by all layers.

Key j of a request is visible to its query i iff both belong to the same stream (the conditional and
unconditional sequences of a guided image), raster(j) <= raster(i), step(j) <= step(i) and j is not a proxy
(unless j is i). The KV cache holds keys in feed order; `ImageKeyMetadata` remembers, per request, the
stream, raster position, feed step and proxy flag of every cached token. A request whose tokens so far are
one stream in strictly increasing raster order with no proxy (prefill, NTP, LlamaGen's row 0) is plain
causal attention: the platform's own kernel is exact for it, and only the other requests are recomputed
with the mask.

An image decoded with exact drafts (docs/exact_drafts.md §3) uses the newest-token rule instead
(`DraftKeyFields`): key j is visible to query i iff j is i, or same stream, j not a proxy,
step(j) <= step(i) < dead_from(j) (the pass that fed the next real token at j's position), and j's cell in
i's static context (the row-limit closed form of `zipar.draft_plan.DraftMaskFields`). Such an image is
masked as soon as it feeds a grid token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_zipar.engine.step_inputs import DraftStepInputs

NEVER = np.iinfo(np.int32).max  # dead_from of a token nothing has superseded (yet)


class DraftKeyFields:
    """Per token of one draft image's KV sequence: its static context (row, column of the cell whose
    predictor it is; row -1: every position at or before its own), its cell (row -1: a prompt token) and
    the pass from which a newer token at its position hides it (`NEVER`: none)."""

    def __init__(self, width: int, window: int, row0_whole: bool) -> None:
        self.width, self.window, self.row0_whole = width, window, row0_whole
        self.context_rows = np.zeros(0, dtype=np.int32)
        self.context_cols = np.zeros(0, dtype=np.int32)
        self.key_rows = np.zeros(0, dtype=np.int32)
        self.key_cols = np.zeros(0, dtype=np.int32)
        self.dead_from = np.zeros(0, dtype=np.int32)
        self.touched: list[int] = []  # earlier tokens the last write superseded (their dead_from changed)

    def write(self, start: int, steps: list[int], inputs: DraftStepInputs) -> None:
        end = start + len(steps)
        if len(self.dead_from) < end:
            grow = max(end, 2 * len(self.dead_from))
            for name in ("context_rows", "context_cols", "key_rows", "key_cols", "dead_from"):
                setattr(self, name, np.resize(getattr(self, name), grow))
        self.context_rows[start:end] = inputs.context_rows
        self.context_cols[start:end] = inputs.context_cols
        self.key_rows[start:end] = inputs.key_rows
        self.key_cols[start:end] = inputs.key_cols
        self.dead_from[start:end] = NEVER
        self.touched = []
        for step, replaced in zip(steps, inputs.supersedes, strict=True):
            if replaced >= 0:
                self.dead_from[replaced] = step
                if replaced < start:
                    self.touched.append(replaced)

    def in_context(self, q: slice, length: int, positions: np.ndarray) -> np.ndarray:
        """Boolean [queries, length]: which keys' cells lie in each query's static context."""
        R, C = self.context_rows[q, None], self.context_cols[q, None]
        kr, kc = self.key_rows[None, :length], self.key_cols[None, :length]
        W = self.width
        limit = np.minimum(W, C + (R - kr) * self.window)
        if self.row0_whole:
            limit = np.where(kr == 0, W, limit)
        grid = (kr < 0) | ((kr == R) & (kc < C)) | ((kr < R) & ((kc == W) | (kc < limit)))
        causal = positions[None, :length] <= positions[q, None]
        return np.where(R < 0, causal, grid)


class ImageKeyMetadata:
    """Stream, raster position, feed step and proxy flag of each token in one request's KV sequence."""

    def __init__(self) -> None:
        self.positions = np.zeros(0, dtype=np.int64)
        self.steps = np.zeros(0, dtype=np.int64)
        self.proxy = np.zeros(0, dtype=bool)
        self.streams: np.ndarray | None = None  # None while every token is in stream 0
        self.drafts: DraftKeyFields | None = None  # exact drafts: the newest-token rule

    def write(
        self,
        start: int,
        positions: list[int],
        steps: list[int],
        proxy: list[bool],
        streams: list[int] | None = None,
        drafts: DraftStepInputs | None = None,
    ) -> None:
        """Record tokens `[start, start + n)`; anything after `start` is dropped (recompute, trimming)."""
        end = start + len(positions)
        if len(self.positions) < end:
            grow = max(end, 2 * len(self.positions))
            self.positions = np.resize(self.positions, grow)
            self.steps = np.resize(self.steps, grow)
            self.proxy = np.resize(self.proxy, grow)
            if self.streams is not None:
                self.streams = np.resize(self.streams, grow)
        self.positions[start:end] = positions
        self.steps[start:end] = steps
        self.proxy[start:end] = proxy
        if streams is not None:
            if self.streams is None:
                self.streams = np.zeros(len(self.positions), dtype=np.int8)
            self.streams[start:end] = streams
        if drafts is not None:
            if self.drafts is None:
                self.drafts = DraftKeyFields(drafts.width, drafts.window, drafts.row0_whole)
            self.drafts.write(start, steps, drafts)

    def is_causal(self, length: int) -> bool:
        positions = self.positions[:length]
        if self.streams is not None and self.streams[:length].any():
            return False
        if self.drafts is not None and (self.drafts.context_rows[:length] >= 0).any():
            return False  # a draft image's grid tokens see their static context, not all before them
        return not self.proxy[:length].any() and bool(np.all(positions[1:] > positions[:-1]))

    def mask(self, first_query: int, num_queries: int) -> np.ndarray:
        """Boolean [num_queries, first_query + num_queries]: which keys each scheduled query may see."""
        length = first_query + num_queries
        q = slice(first_query, length)
        if self.drafts is not None:
            visible = self.drafts.in_context(q, length, self.positions)
            visible &= self.steps[q, None] < self.drafts.dead_from[None, :length]
            visible &= self.steps[None, :length] <= self.steps[q, None]
        else:
            visible = (self.positions[None, :length] <= self.positions[q, None]) & (
                self.steps[None, :length] <= self.steps[q, None]
            )
        visible &= ~self.proxy[None, :length]
        if self.streams is not None:
            visible &= self.streams[None, :length] == self.streams[q, None]
        rows = np.arange(num_queries)
        visible[rows, first_query + rows] = True
        return visible


@dataclass
class ImageAttentionRows:
    """One ZipAR request's tokens in this step: rows `[query_start, query_start + count)` of the batch,
    which are its KV tokens `[first_token, first_token + count)` described by `keys`; `is_masked` is False
    while the request is still plain causal."""

    batch_index: int
    req_id: str
    query_start: int
    first_token: int
    count: int
    keys: ImageKeyMetadata = field(repr=False)
    is_masked: bool
    _additive: torch.Tensor | None = field(default=None, repr=False)

    @property
    def seq_len(self) -> int:
        return self.first_token + self.count

    @functools.cached_property
    def mask(self) -> np.ndarray | None:
        """Boolean [count, seq_len] visibility of the step's queries (None while causal); built on first
        use, by the CPU backend only (FlexAttention evaluates the rule on the device)."""
        return self.keys.mask(self.first_token, self.count) if self.is_masked else None

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[count, seq_len]: 0 where visible, -inf elsewhere (built once per step, shared by all layers)."""
        if self._additive is None:
            visible = torch.from_numpy(self.mask)
            self._additive = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
        return self._additive


@dataclass
class ZipARAttentionInputs:
    """What every attention layer needs this step: the ZipAR requests' rows and masks, and which
    requests finished (their per-layer key/value rows can go)."""

    requests: list[ImageAttentionRows] = field(default_factory=list)
    finished: tuple[str, ...] = ()
    # The stock kernel's metadata with masked requests' contexts cut short (built by the first layer).
    stock_metadata: object | None = None

    @functools.cached_property
    def masked(self) -> list[ImageAttentionRows]:
        """The requests that need the mask (read by the layers, after every `add` of the step)."""
        return [r for r in self.requests if r.is_masked]

    @functools.cached_property
    def masked_tokens(self) -> int:
        return sum(r.count for r in self.masked)

    def covers(self, num_requests: int, num_tokens: int) -> bool:
        """Whether the masked requests are the whole batch: every row of the step is theirs."""
        return len(self.masked) == num_requests and self.masked_tokens == num_tokens

    @functools.cached_property
    def kernel_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(requests, mask) for `masked_kernel.masked_paged_attention`: one int64 row per masked request
        (block-table row, first query row, query count, sequence length, mask offset) and every request's
        visibility matrix, flattened into one uint8 tensor. Built once per step, shared by all layers."""
        masked = self.masked
        rows = np.zeros((len(masked), 5), dtype=np.int64)
        offset = 0
        for i, r in enumerate(masked):
            rows[i] = (r.batch_index, r.query_start, r.count, r.seq_len, offset)
            offset += r.mask.size
        flat = np.concatenate([r.mask.ravel() for r in masked]) if masked else np.zeros(0, dtype=bool)
        return torch.from_numpy(rows), torch.from_numpy(flat.view(np.uint8))

    def add(
        self,
        batch_index: int,
        req_id: str,
        query_start: int,
        first_token: int,
        count: int,
        keys: ImageKeyMetadata,
    ) -> None:
        is_masked = not keys.is_causal(first_token + count)
        self.requests.append(
            ImageAttentionRows(batch_index, req_id, query_start, first_token, count, keys, is_masked)
        )
