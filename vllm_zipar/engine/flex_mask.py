"""The ZipAR attention rule (ZIPAR.md §3) as a FlexAttention `mask_mod` over per-token device buffers.

Pure PyTorch (no vLLM import), so the GPU benchmark runs it where vLLM cannot be installed. The rule reads,
for the request of a query, four per-token tensors kept in persistent device buffers indexed by a *slot*
(one per masked image request, stable while it lives) and its logical token index (the token's place in the
request's KV sequence, i.e. feed order): raster position, feed step, the stream a query belongs to, and the
stream a key belongs to (-1 for proxies, which no other token may see). Key j is visible to query i iff
j == i, or same stream, raster(j) <= raster(i) and step(j) <= step(i). A request whose batch row has slot -1
is plain causal (j <= i). The buffers are written once per step and only for tokens the step feeds, so one
compiled mask serves every step; the batch-row -> slot table is the only per-step rewrite.

Exact drafts (docs/exact_drafts.md §3) generalise the rule with five more per-token fields and three per
slot: a query's static context (row, column of the cell whose predictor it is; row -1: every position at
or before its own, which is the rule above), a key's cell, and `dead_from` (the pass from which a newer
token at the key's position hides it). Key j is visible to query i iff j == i, or same stream, j in i's
context, step(j) <= step(i) < dead_from(j). Requests without drafts keep context row -1 and dead_from
`NEVER`, which is exactly the rule above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CAUSAL = -1  # slot of a batch row whose attention is plain causal
NEVER = 2**31 - 1  # dead_from of a token no newer one hides


@dataclass
class ZipARMaskBuffers:
    """Persistent device tensors read by `zipar_visible`: [slots, tokens] per-token values, [rows] slots."""

    positions: torch.Tensor  # int32 raster position of each logical token
    steps: torch.Tensor  # int32 plan pass that fed it
    query_streams: torch.Tensor  # int8 stream (0 conditional, 1 unconditional)
    key_streams: torch.Tensor  # int8 stream as a key: -1 for proxies
    batch_slots: torch.Tensor  # int32 slot of each batch row, CAUSAL for causal rows
    context_rows: torch.Tensor  # int32 row of the cell whose predictor the token is (-1: all before it)
    context_cols: torch.Tensor  # int32 its column
    key_rows: torch.Tensor  # int32 the token's own cell row (-1: a prompt token)
    key_cols: torch.Tensor  # int32 its column (the grid width for an EOL)
    dead_from: torch.Tensor  # int32 the pass from which a newer token at its position hides it
    slot_widths: torch.Tensor  # [slots] int32 grid width of the slot's image
    slot_windows: torch.Tensor  # [slots] int32 its effective window
    slot_row0_whole: torch.Tensor  # [slots] bool: row 0 is seen whole (layouts without EOL)

    @classmethod
    def allocate(cls, slots: int, tokens: int, rows: int, device: torch.device | str) -> ZipARMaskBuffers:
        return cls(
            positions=torch.zeros(slots, tokens, dtype=torch.int32, device=device),
            steps=torch.zeros(slots, tokens, dtype=torch.int32, device=device),
            query_streams=torch.zeros(slots, tokens, dtype=torch.int8, device=device),
            key_streams=torch.zeros(slots, tokens, dtype=torch.int8, device=device),
            batch_slots=torch.full((rows,), CAUSAL, dtype=torch.int32, device=device),
            context_rows=torch.full((slots, tokens), -1, dtype=torch.int32, device=device),
            context_cols=torch.zeros(slots, tokens, dtype=torch.int32, device=device),
            key_rows=torch.full((slots, tokens), -1, dtype=torch.int32, device=device),
            key_cols=torch.zeros(slots, tokens, dtype=torch.int32, device=device),
            dead_from=torch.full((slots, tokens), NEVER, dtype=torch.int32, device=device),
            slot_widths=torch.ones(slots, dtype=torch.int32, device=device),
            slot_windows=torch.ones(slots, dtype=torch.int32, device=device),
            slot_row0_whole=torch.zeros(slots, dtype=torch.bool, device=device),
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

    def write_draft_fields(
        self,
        slots: torch.Tensor,
        tokens: torch.Tensor,
        context_rows: torch.Tensor,
        context_cols: torch.Tensor,
        key_rows: torch.Tensor,
        key_cols: torch.Tensor,
        dead_from: torch.Tensor,
    ) -> None:
        """The exact-draft fields of tokens `(slots[k], tokens[k])`; tokens written by `write_tokens` alone
        keep whatever these held, so a request without drafts writes context row -1 and `NEVER` here."""
        device = self.positions.device
        index = (slots.to(device, torch.long), tokens.to(device, torch.long))
        for buffer, values in (
            (self.context_rows, context_rows),
            (self.context_cols, context_cols),
            (self.key_rows, key_rows),
            (self.key_cols, key_cols),
            (self.dead_from, dead_from),
        ):
            buffer.index_put_(index, values.to(device, torch.int32))

    def set_slot_rule(self, slot: int, width: int, window: int, row0_whole: bool) -> None:
        self.slot_widths[slot] = width
        self.slot_windows[slot] = window
        self.slot_row0_whole[slot] = row0_whole

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
    R, C = buffers.context_rows[row, q], buffers.context_cols[row, q]
    kr, kc = buffers.key_rows[row, kv], buffers.key_cols[row, kv]
    W = buffers.slot_widths[row]
    limit = torch.where(
        (kr == 0) & buffers.slot_row0_whole[row],
        W,
        torch.minimum(W, C + (R - kr) * buffers.slot_windows[row]),
    )
    static = (kr < 0) | ((kr == R) & (kc < C)) | ((kr < R) & ((kc == W) | (kc < limit)))
    in_context = torch.where(R < 0, buffers.positions[row, kv] <= buffers.positions[row, q], static)
    step_q = buffers.steps[row, q]
    zipar = (kv_idx == q_idx) | (
        in_context
        & (buffers.steps[row, kv] <= step_q)
        & (step_q < buffers.dead_from[row, kv])
        & (buffers.key_streams[row, kv] == buffers.query_streams[row, q])
    )
    return torch.where(slot == CAUSAL, kv_idx <= q_idx, zipar)
