"""One image-model family as the engine and the front-ends see it: the only model interface they use.

A family (LlamaGen, Emu3, ...) implements `ImageModel` once, in `models/`, and `models/registry.py` maps its
`model_type` to it. The engine asks it for the grid of a request (its layout, the EOL column) and the range
of vocabulary ids that are visual tokens; front-ends ask it for prompt and negative-prompt ids, sizes,
sampling defaults, engine arguments and the VQ decoder. Nothing outside `models/` names a family.

Engine-side members are cheap and read only the model's config (the engine core builds one per process);
front-end members may load the tokenizer or the VQ decoder lazily.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_zipar.zipar.layout import GridLayout

QUOTE_CHARS = 40


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)`, cut to a short prefix: an error message must not echo a 50 MiB prompt back."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class PromptError(ValueError):
    """A prompt the model cannot take (unknown class, empty text, too long); `code` names why."""

    def __init__(self, message: str, code: str = "invalid_prompt", param: str = "prompt") -> None:
        super().__init__(message)
        self.code = code
        self.param = param


@dataclass(frozen=True, slots=True)
class VisualTokens:
    """The vocabulary ids that are image (VQ) tokens: `[start, stop)`; VQ code `i` is id `start + i`.

    The engine samples grid cells from these logits only; every other id (text, EOL, closing tokens) is
    either a prompt token or forced."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise ValueError(f"visual token range [{self.start}, {self.stop}) is empty or negative")

    @property
    def count(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True, slots=True)
class ImageSize:
    """An output size the model supports: pixels and the token grid behind them."""

    width: int
    height: int
    grid: tuple[int, int]  # (rows, columns) of VQ tokens

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"


class ImageModel(ABC):
    """A served image-generation model: one subclass per family, built from the model directory."""

    model_type: str  # the config.json `model_type` this family serves
    family: str  # a short name for logs and the playground ("LlamaGen", "Emu3")
    prompt_kind: str  # "class" (class-to-image: a class index or name) or "text" (text-to-image)

    def __init__(self, model_dir: str | Path, hf_config: Any) -> None:
        self.model_dir = Path(model_dir)
        self.hf_config = hf_config

    @classmethod
    @abstractmethod
    def load_config(cls, model_dir: Path) -> Any:
        """The transformers config of `model_dir`, as vLLM will read it."""

    # ------------------------------------------------------------------ engine side (config only)

    @property
    @abstractmethod
    def visual_tokens(self) -> VisualTokens: ...

    @property
    def eol_token(self) -> int | None:
        """The end-of-line token fed after every row (ZIPAR.md §1), or None for layouts without one."""
        return None

    @property
    def closing_tokens(self) -> tuple[int, ...]:
        """Forced tokens after the last row's EOL (Emu3: EOF, image end, EOS): never sampled, never fed."""
        return ()

    @property
    @abstractmethod
    def default_grid(self) -> tuple[int, int]:
        """(rows, columns) of a request that names no size."""

    def layout(self, prompt_len: int, grid: tuple[int, int] | None = None) -> GridLayout:
        """The grid of one sequence with a `prompt_len`-token prompt."""
        height, width = grid if grid is not None else self.default_grid
        eol = self.eol_token
        return GridLayout(prompt_len, height, width, eol=eol is not None, eol_token=eol)

    def check_grid(self, grid: tuple[int, int]) -> None:
        """Refuse a grid this model cannot decode (engine side: requests that bypassed a front-end)."""
        if grid not in {size.grid for size in self.sizes()}:
            allowed = ", ".join(f"{h}x{w}" for h, w in sorted({s.grid for s in self.sizes()}))
            raise ValueError(f"image_grid {grid[0]}x{grid[1]} is not one of this model's grids ({allowed})")

    # ------------------------------------------------------------------ front-end side

    @abstractmethod
    def sizes(self) -> list[ImageSize]:
        """Every output size the model supports, the native one first."""

    @property
    def native_size(self) -> ImageSize:
        return self.sizes()[0]

    def size(self, name: str | None) -> ImageSize:
        """The `ImageSize` called `name` ("WxH"; None or "auto": native); ValueError lists the allowed."""
        if name is None or name == "auto":
            return self.native_size
        for size in self.sizes():
            if size.name == name:
                return size
        allowed = ", ".join(repr(s.name) for s in self.sizes())
        raise ValueError(f"size {name!r} is not supported by this model; use one of {allowed} or 'auto'")

    @property
    @abstractmethod
    def sampling_defaults(self) -> dict[str, Any]:
        """Defaults of `cfg_scale`, `cfg_interval`, `temperature`, `top_k`, `top_p`."""

    @abstractmethod
    def prompt_ids(self, prompt: str | int, size: ImageSize) -> list[int]:
        """The conditional prompt of one image (PromptError if the model cannot take it)."""

    @abstractmethod
    def unconditional_prompt_ids(self, negative_prompt: str | None, size: ImageSize) -> list[int]:
        """The prompt classifier-free guidance runs against (`negative_prompt` None: the model's default)."""

    @property
    def takes_negative_prompt(self) -> bool:
        return False

    @property
    def max_prompt_chars(self) -> int:
        return 2000

    @abstractmethod
    def max_model_len(self) -> int:
        """The longest KV sequence of a request: both guided streams of the largest grid, with row feeds."""

    def engine_args(self) -> dict[str, Any]:
        """vLLM engine arguments this family needs beyond the common ones (architecture, lengths)."""
        return {"max_model_len": self.max_model_len()}

    @abstractmethod
    def load_decoder(self) -> Any:
        """The VQ decoder: an object with `to_pil_images(grid_ids [B, H, W] of vocabulary ids)`."""

    def describe(self) -> dict[str, Any]:
        """What the playground shows about the model."""
        return {
            "family": self.family,
            "prompt_kind": self.prompt_kind,
            "size": self.native_size.name,
            "sizes": [size.name for size in self.sizes()],
            "grid": list(self.native_size.grid),
            "negative_prompt": self.takes_negative_prompt,
        }

