"""LlamaGen class-to-image as an `ImageModel`: a class token in, one fixed square grid of VQ-16 codes out.

The prompt is one class token (a class index or a name, `class_names.py`); classifier-free guidance runs
against the null class. The vocabulary is the codebook, so every id is a visual token and ids are codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from vllm_zipar.models.class_names import ClassNameError, ClassNames
from vllm_zipar.models.image_decoder import ImageDecoder
from vllm_zipar.models.image_grid import VisualTokens
from vllm_zipar.models.image_model import ImageModel
from vllm_zipar.models.image_prompts import ImageSize, SamplingDefaults
from vllm_zipar.models.prompt_error import PromptError


class LlamaGenImageModel(ImageModel):
    family = "LlamaGen"
    prompt_kind = "class"

    @classmethod
    def load_config(cls, model_dir: Path) -> Any:
        from vllm_zipar.models.model_dir import load_config

        return load_config(model_dir)

    @property
    def visual_tokens(self) -> VisualTokens:
        return VisualTokens.contiguous(0, int(self.hf_config.codebook_size))

    @property
    def input_vocab_size(self) -> int:
        # The codes, then the class tokens (the null class last): ids [codebook, codebook + classes].
        return int(self.hf_config.codebook_size + self.hf_config.num_class_embeddings)

    @property
    def default_grid(self) -> tuple[int, int]:
        grid = int(self.hf_config.grid_size)
        return grid, grid

    def check_grid(self, grid: tuple[int, int]) -> None:
        if tuple(grid) != self.default_grid:
            raise ValueError(
                f"image_grid {grid[0]}x{grid[1]}: this LlamaGen model decodes {self.default_grid[0]}x"
                f"{self.default_grid[1]} grids only (its 2D RoPE table is square)"
            )

    def sizes(self) -> list[ImageSize]:
        side = int(self.hf_config.image_size)
        return [ImageSize(side, side, self.default_grid)]

    @property
    def unconditional_context(self) -> str:
        return "the null class"

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        return SamplingDefaults.from_dict(self.hf_config.sampling_defaults)

    @cached_property
    def classes(self) -> ClassNames:
        return ClassNames.for_config(self.hf_config)

    @property
    def num_classes(self) -> int:
        return self.classes.num_classes

    @property
    def class_names(self) -> list[str] | None:
        return self.classes.primary or None

    @property
    def max_prompt_chars(self) -> int:
        return self.classes.max_prompt_chars

    def class_label(self, prompt: str | int) -> int:
        if isinstance(prompt, bool):
            raise PromptError(f"class label must be an int or a class name, got {prompt!r}", "unknown_class")
        if isinstance(prompt, int):
            prompt = str(prompt)
        try:
            return self.classes.label(prompt)
        except ClassNameError as err:
            raise PromptError(str(err), "unknown_class") from None

    def prompt_ids(self, prompt: str | int, size: ImageSize) -> list[int]:
        return [self.hf_config.class_token_id(self.class_label(prompt))]

    def unconditional_prompt_ids(
        self, negative_prompt: str | None, size: ImageSize, prompt_ids: Sequence[int] | None = None
    ) -> list[int]:
        if negative_prompt is not None:
            raise PromptError(
                "negative_prompt is not supported by class-to-image models (guidance runs against the "
                "null class)",
                "unsupported_parameter",
                "negative_prompt",
            )
        return [self.hf_config.null_class_token_id]

    def max_model_len(self) -> int:
        return int(self.hf_config.max_position_embeddings)

    def engine_args(self, max_model_len: int | None = None) -> dict[str, Any]:
        # vLLM caps max_model_len at the config's max_position_embeddings; a longer sequence (drafts'
        # superseded tokens) needs no new positions, as each stream keeps its own, so lift the cap.
        length = max_model_len or self.max_model_len()
        if length <= self.max_model_len():
            return {"max_model_len": length}
        return {"max_model_len": length, "hf_overrides": {"max_position_embeddings": length}}

    def load_decoder(self) -> ImageDecoder:
        # Vocabulary ids are codes here, so the VQ model decodes the grids as they are.
        from vllm_zipar.models.vq.llamagen_vq import LlamaGenVQConfig, load_llamagen_vq

        config = self.hf_config
        return load_llamagen_vq(self.model_dir / config.vq_checkpoint, LlamaGenVQConfig(**config.vq_config))
