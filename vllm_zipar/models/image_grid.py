"""What the engine knows about a model family: the grid of a request and which tokens are image tokens.

The engine core (scheduler, runner) types against `ImageGrid` only: the grid layout of a request (rows,
columns, the EOL column), whether a grid is one the model decodes, and `VisualTokens`, which says where the
model's logits score the VQ codes and which vocabulary ids those codes are. Everything here is read from the
model's config alone; nothing loads a tokenizer or a VQ (the engine builds one per process).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, runtime_checkable

import torch

from vllm_zipar.zipar.layout import GridLayout


def _check_columns(name: str, values: Sequence[int]) -> None:
    if isinstance(values, range):
        if values.step != 1 or len(values) == 0 or values.start < 0:
            raise ValueError(f"visual token {name} {values} must be a non-empty range of step 1 from >= 0")
        return
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise ValueError(f"visual token {name} must be distinct ints >= 0, got {len(values)} values")


@dataclass(frozen=True)
class VisualTokens:
    """The image (VQ) tokens of a model: code `c` is scored by logits column `logits[c]` and is vocabulary id
    `ids[c]`.

    The engine samples a grid cell's code from the `logits` columns only (text, EOL and closing ids are
    forced, never sampled), then feeds back and returns the code's id. Columns and ids are separate because
    models differ: LlamaGen's vocabulary is its codebook (both `range(0, n)`); Emu3 scores codes in its one
    LM head at the codes' own ids (both `range(start, stop)`); Janus-Pro scores them in a separate
    16,384-wide head (`logits=range(0, 16384)`) while their ids sit above the text vocabulary; Chameleon-style
    vocabularies map codes to ids through a table (`ids` and `logits` tuples in code order).
    """

    logits: range | tuple[int, ...]  # the logits column scoring code c: logits[c]
    ids: range | tuple[int, ...]  # the vocabulary id of code c: ids[c]

    def __post_init__(self) -> None:
        _check_columns("logits", self.logits)
        _check_columns("ids", self.ids)
        if len(self.logits) != len(self.ids):
            raise ValueError(f"{len(self.logits)} visual logits columns for {len(self.ids)} visual ids")

    @classmethod
    def contiguous(cls, id_start: int, count: int, logits_start: int | None = None) -> VisualTokens:
        """Codes 0..count-1 at ids `id_start + c`, scored at column `logits_start + c` (default: the id)."""
        column = id_start if logits_start is None else logits_start
        return cls(range(column, column + count), range(id_start, id_start + count))

    @property
    def count(self) -> int:
        """The codebook size: how many codes a cell can take."""
        return len(self.ids)

    def visual_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The columns of `logits` [N, vocab] that score the codes, in code order: [N, count]."""
        columns = self.logits
        if isinstance(columns, range):
            if columns.start == 0 and columns.stop == logits.shape[-1]:
                return logits
            return logits[:, columns.start : columns.stop]
        return logits.index_select(-1, self._logits_table.to(logits.device))

    def code_to_id(self, codes: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids of VQ codes (any shape; ints in [0, count))."""
        if isinstance(self.ids, range):
            return codes + self.ids.start
        return self._id_table.to(codes.device)[codes]

    def id_to_code(self, ids: torch.Tensor) -> torch.Tensor:
        """VQ codes of vocabulary ids (any shape); ValueError if one is not a visual token."""
        ids = ids.long()
        if isinstance(self.ids, range):
            codes = ids - self.ids.start
            bad = (codes < 0) | (codes >= self.count)
        else:
            table = self._code_table.to(ids.device)
            inside = (ids >= 0) & (ids < len(table))
            codes = torch.where(inside, table[ids.clamp(0, len(table) - 1)], -1)
            bad = codes < 0
        if bool(bad.any()):
            raise ValueError(f"a grid holds ids that are not visual tokens, e.g. {int(ids[bad][0])}")
        return codes

    @cached_property
    def _logits_table(self) -> torch.Tensor:
        return torch.tensor(self.logits, dtype=torch.long)

    @cached_property
    def _id_table(self) -> torch.Tensor:
        return torch.tensor(self.ids, dtype=torch.long)

    @cached_property
    def _code_table(self) -> torch.Tensor:
        table = torch.full((max(self.ids) + 1,), -1, dtype=torch.long)
        table[self._id_table] = torch.arange(self.count)
        return table


@runtime_checkable
class ImageGrid(Protocol):
    """The engine's view of a family: grids and visual tokens, from the model's config alone."""

    @property
    @abstractmethod
    def visual_tokens(self) -> VisualTokens: ...

    @property
    @abstractmethod
    def input_vocab_size(self) -> int:
        """How many input ids the model embeds: every prompt, visual and EOL id lies below it."""

    @property
    def eol_token(self) -> int | None:
        """The end-of-line token fed after every row (ZIPAR.md §1), or None for layouts without one."""
        return None

    @property
    @abstractmethod
    def default_grid(self) -> tuple[int, int]:
        """(rows, columns) of a request that names no size."""

    def layout(self, prompt_len: int, grid: tuple[int, int] | None = None) -> GridLayout:
        """The grid of one sequence with a `prompt_len`-token prompt."""
        height, width = grid if grid is not None else self.default_grid
        eol = self.eol_token
        return GridLayout(prompt_len, height, width, eol=eol is not None, eol_token=eol)

    @abstractmethod
    def check_grid(self, grid: tuple[int, int]) -> None:
        """Refuse (ValueError) a grid this model cannot decode: requests that bypassed a front-end."""
