"""The ZipAR attention rule (ZIPAR.md §3) as a FlexAttention `mask_mod` over per-token device buffers.

Pure PyTorch (no vLLM import), so the GPU benchmark runs it where vLLM cannot be installed. The rule reads,
for the request of a query, four per-token tensors kept in persistent device buffers indexed by a *slot*
(one per masked image request, stable while it lives) and its logical token index (the token's place in the
request's KV sequence, i.e. feed order): raster position, feed step, the stream a query belongs to, and the
stream a key belongs to (-1 for proxies, which no other token may see). Key j is visible to query i iff
j == i, or same stream, raster(j) <= raster(i) and step(j) <= step(i). A request whose batch row has slot -1
is plain causal (j <= i). The buffers are written once per step and only for tokens the step feeds, so one
compiled mask serves every step; the batch-row -> slot table is the only per-step rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CAUSAL = -1  # slot of a batch row whose attention is plain causal


@dataclass
class ZipARMaskBuffers:
    """Persistent device tensors read by `zipar_visible`: [slots, tokens] per-token values, [rows] slots."""

    positions: torch.Tensor  # int32 raster position of each logical token
    steps: torch.Tensor  # int32 plan pass that fed it
    query_streams: torch.Tensor  # int8 stream (0 conditional, 1 unconditional)
    key_streams: torch.Tensor  # int8 stream as a key: -1 for proxies
    batch_slots: torch.Tensor  # int32 slot of each batch row, CAUSAL for causal rows

    @classmethod
    def allocate(cls, slots: int, tokens: int, rows: int, device: torch.device | str) -> ZipARMaskBuffers:
        return cls(
            positions=torch.zeros(slots, tokens, dtype=torch.int32, device=device),
            steps=torch.zeros(slots, tokens, dtype=torch.int32, device=device),
            query_streams=torch.zeros(slots, tokens, dtype=torch.int8, device=device),
            key_streams=torch.zeros(slots, tokens, dtype=torch.int8, device=device),
            batch_slots=torch.full((rows,), CAUSAL, dtype=torch.int32, device=device),
        )

    @property
    def max_tokens(self) -> int:
        return self.positions.shape[1]

    def write_tokens(
        self,
        slots: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        steps: torch.Tensor,
        streams: torch.Tensor,
        proxy: torch.Tensor,
    ) -> None:
        """Record tokens `(slots[k], tokens[k])` (1-D CPU tensors of equal length): one upload per field."""
        device = self.positions.device
        index = (slots.to(device, torch.long), tokens.to(device, torch.long))
        self.positions.index_put_(index, positions.to(device, torch.int32))
        self.steps.index_put_(index, steps.to(device, torch.int32))
        query_streams = streams.to(torch.int8)
        self.query_streams.index_put_(index, query_streams.to(device))
        self.key_streams.index_put_(index, query_streams.masked_fill(proxy, -1).to(device))

    def set_batch_slots(self, batch_slots: torch.Tensor) -> None:
        """The slot of each batch row of this step (CAUSAL for causal rows); rows past it become causal."""
        count = batch_slots.shape[0]
        self.batch_slots[:count].copy_(batch_slots.to(self.batch_slots.device, torch.int32))
        self.batch_slots[count:].fill_(CAUSAL)


def zipar_visible(
    buffers: ZipARMaskBuffers, request: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
) -> torch.Tensor:
    """May logical query `q_idx` of batch row `request` attend to its logical key `kv_idx`?

    Written for `mask_mod` tracing: only gathers and comparisons. Out-of-range indices (paged slots past a
    request's length, which the caller masks out anyway) are clamped so that every gather stays in bounds.
    """
    slot = buffers.batch_slots[request]
    row = slot.clamp(min=0)
    last = buffers.max_tokens - 1
    q = q_idx.clamp(0, last)
    kv = kv_idx.clamp(0, last)
    zipar = (kv_idx == q_idx) | (
        (buffers.positions[row, kv] <= buffers.positions[row, q])
        & (buffers.steps[row, kv] <= buffers.steps[row, q])
        & (buffers.key_streams[row, kv] == buffers.query_streams[row, q])
    )
    return torch.where(slot == CAUSAL, kv_idx <= q_idx, zipar)
