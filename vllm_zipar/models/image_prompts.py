"""What the front-ends (offline generator, HTTP route, playground) know about a family beyond its grid.

`ImagePrompts` is their view: the output sizes and the token grids behind them, the prompt and the
unconditional (negative) prompt of an image as token ids, typed `SamplingDefaults`, the class list of a
class-to-image model, the engine arguments the family needs, and its pixel decoder. These members may load
the tokenizer or the VQ lazily; the engine process never calls them.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from vllm_zipar.models.image_decoder import ImageDecoder


@dataclass(frozen=True, slots=True)
class ImageSize:
    """An output size the model supports: pixels and the token grid behind them."""

    width: int
    height: int
    grid: tuple[int, int]  # (rows, columns) of VQ tokens

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class SamplingDefaults:
    """What an image request that names no sampling value gets (front-ends apply them; the engine never
    does). `cfg_scale` 1 runs no unconditional prompt; `cfg_interval` -1 guides every cell; `top_k` 0
    disables it."""

    cfg_scale: float
    cfg_interval: int
    temperature: float
    top_k: int
    top_p: float

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"sampling default {field.name} must be an int, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"sampling default {field.name} must be a number, got {value!r}")
            else:
                object.__setattr__(self, field.name, float(value))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SamplingDefaults:
        """From a config's `sampling_defaults` object; every key must be known and present."""
        names = [field.name for field in dataclasses.fields(cls)]
        unknown, missing = set(values) - set(names), set(names) - set(values)
        if unknown or missing:
            raise ValueError(
                f"sampling_defaults: unknown keys {sorted(unknown)}, missing keys {sorted(missing)} "
                f"(expected {names})"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: Mapping[str, Any]) -> SamplingDefaults:
        """These defaults with some keys replaced (a model directory's own choices)."""
        return SamplingDefaults.from_dict({**self.to_dict(), **overrides})


@runtime_checkable
class ImagePrompts(Protocol):
    """The front-ends' view of a family (beyond `ImageGrid`): sizes, prompts, defaults, the decoder."""

    family: str  # a short name for logs and the playground ("LlamaGen", "Emu3")
    prompt_kind: str  # "class" (class-to-image: a class index or name) or "text" (text-to-image)

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
    def sampling_defaults(self) -> SamplingDefaults: ...

    @abstractmethod
    def prompt_ids(self, prompt: str | int, size: ImageSize) -> list[int]:
        """The conditional prompt of one image (PromptError if the model cannot take it)."""

    @abstractmethod
    def unconditional_prompt_ids(
        self, negative_prompt: str | None, size: ImageSize, prompt_ids: Sequence[int] | None = None
    ) -> list[int]:
        """The prompt classifier-free guidance runs against (`negative_prompt` None: the model's default;
        PromptError where the model takes no negative prompt). `prompt_ids` is the image's conditional
        prompt, for families whose unconditional prompt is derived from it (Janus pads it)."""

    @property
    def takes_negative_prompt(self) -> bool:
        return False

    @property
    def unconditional_context(self) -> str:
        """What classifier-free guidance runs against, in words (error messages and docs)."""
        return "a negative prompt" if self.takes_negative_prompt else "its own unconditional prompt"

    @property
    def max_prompt_chars(self) -> int:
        return 2000

    @property
    def num_classes(self) -> int | None:
        """How many classes a class-to-image model draws (None: text-to-image)."""
        return None

    @property
    def class_names(self) -> list[str] | None:
        """Each class's name, by label, where the model has names (None otherwise)."""
        return None

    @abstractmethod
    def max_model_len(self) -> int:
        """The longest KV sequence of a request: both guided streams of the largest grid, with row feeds."""

    def engine_args(self, max_model_len: int | None = None) -> dict[str, Any]:
        """vLLM engine arguments this family needs beyond the common ones (architecture, lengths), for
        sequences up to `max_model_len` (default: `max_model_len()`; longer ones hold exact drafts'
        superseded tokens, and a family lifts its config's position cap to match)."""
        return {"max_model_len": max_model_len or self.max_model_len()}

    @abstractmethod
    def load_decoder(self) -> ImageDecoder:
        """The pixel decoder, on the CPU (front-ends move it with `to`)."""

    def describe(self) -> dict[str, Any]:
        """What the playground shows about the model (besides the typed fields it reads itself)."""
        return {
            "family": self.family,
            "prompt_kind": self.prompt_kind,
            "size": self.native_size.name,
            "sizes": [size.name for size in self.sizes()],
            "grid": list(self.native_size.grid),
            "negative_prompt": self.takes_negative_prompt,
        }
