"""Lumina-mGPT text-to-image as an `ImageModel`: a Lumina Hugging Face directory, unchanged, with ZipAR.

Prompts are what Lumina's `FlexARInferenceSolver.generate` builds (lumina_mgpt/inference_solver.py, with
`generate_examples/generate.py`'s question): one human turn "Generate an image of {w}x{h} according to the
following prompt:\\n{prompt}" closed by the turn separator `<reserved08706>` and no assistant text
(`data/convertsation.py`), tokenized by the directory's tokenizer without special tokens and preceded by BOS
(`xllmx/model/tokenizer.py`, `encode(..., bos=True)`). Lumina's model then emits BOI and the height and
width tokens itself; here they are forced for the requested size and end the prompt. Every row of W image
tokens ends with EOL `<reserved08799>`; EOI `<eoss>` closes the image and Lumina then samples the turn end
`<reserved08706>` as text (forced or sampled, neither changes a pixel: the engine ends the image at its last
cell). Guidance runs Lumina's unconditional context, which starts at BOI
(`LLMImageStartTriggeredUnbatchedClassifierFreeGuidanceLogitsProcessor`: `input_ids[:, boi_index:]`): BOI and
the two resolution tokens, no text, so no negative prompt. Sizes: Lumina's crop-size list at the checkpoint's
area (`data/item_processor.py` `generate_crop_size_list`, 32-pixel units, aspect ratios up to 4), the square
native size first, 16 pixels per token (768 -> 48x48). The native size comes from `zipar.json`
(`image_size`), else from the directory name (`Lumina-mGPT-7B-768`). Defaults from Lumina's README: guidance
4.0, image top-k 2000, temperature 1. Pixels: Meta's Chameleon VQGAN (`vqgan.yaml` + `vqgan.ckpt` in the
directory, or `zipar.json`'s `vqgan_config` / `vqgan_checkpoint`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from vllm_zipar.models.hf_image_model import OPTIONS_FILE, HFImageModel
from vllm_zipar.models.image_grid import VisualTokens
from vllm_zipar.models.image_prompts import ImageSize, SamplingDefaults
from vllm_zipar.models.lumina_checkpoint import (
    DOWNSAMPLE,
    END_OF_TURN_TOKEN,
    RESOLUTION_UNIT,
    LuminaTokens,
)
from vllm_zipar.models.prompt_error import PromptError, quote

PROMPT_TEMPLATE = "Generate an image of {width}x{height} according to the following prompt:\n{prompt}"
SAMPLING_DEFAULTS = SamplingDefaults(cfg_scale=4.0, cfg_interval=-1, temperature=1.0, top_k=2000, top_p=1.0)
MAX_ASPECT_RATIO = 4.0  # generate_crop_size_list's max_ratio
MAX_PROMPT_TOKENS = 512  # per prompt; bounds max_model_len
VQGAN_CONFIG = "vqgan.yaml"
VQGAN_CHECKPOINT = "vqgan.ckpt"


def lumina_crop_sizes(image_size: int, unit: int = RESOLUTION_UNIT) -> list[tuple[int, int]]:
    """(width, height) pairs Lumina generates at `image_size`'s area, in the order of its
    `generate_crop_size_list((image_size // 32) ** 2, 32)`: for each width in units (widest first), the
    tallest height whose area fits, if the aspect ratio is at most 4."""
    budget = (image_size // unit) ** 2
    sizes = []
    width, height = budget, 1
    while width > 0:
        if max(width, height) / min(width, height) <= MAX_ASPECT_RATIO:
            sizes.append((width * unit, height * unit))
        if (height + 1) * width <= budget:
            height += 1
        else:
            width -= 1
    return sizes


class LuminaImageModel(HFImageModel):
    family = "Lumina-mGPT"
    prompt_kind = "text"

    option_keys = frozenset({"image_size", "vqgan_config", "vqgan_checkpoint", "sampling_defaults"})

    # ------------------------------------------------------------------ engine side

    @cached_property
    def tokens(self) -> LuminaTokens:
        return LuminaTokens.from_config(self.hf_config)

    @property
    def visual_tokens(self) -> VisualTokens:
        # The head scores the whole vocabulary: code c is scored at its own id's column.
        ids = self.tokens.image_ids
        return VisualTokens(logits=ids, ids=ids)

    @property
    def input_vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @property
    def eol_token(self) -> int:
        return self.tokens.eol

    @property
    def closing_tokens(self) -> tuple[int, ...]:
        """After the last row's EOL: EOI (forced by Lumina's `MultiModalLogitsProcessor`), then the turn end
        its generate stops at. Never sampled or fed here, but they count against the model's positions."""
        return self.tokens.eoi, self.tokens.end_of_turn

    @property
    def default_grid(self) -> tuple[int, int]:
        return self.native_size.grid

    def check_grid(self, grid: tuple[int, int]) -> None:
        # Any grid of whole 32-pixel units with resolution tokens in the vocabulary that fits the positions
        # (the front-ends offer Lumina's crop sizes).
        height, width = grid
        units = RESOLUTION_UNIT // DOWNSAMPLE
        if height < 1 or width < 1 or height % units or width % units:
            raise ValueError(
                f"image_grid {height}x{width}: rows and columns must be positive multiples of {units}"
            )
        for side in (height, width):
            if side // units not in self.tokens.resolution_ids:
                raise ValueError(
                    f"image_grid {height}x{width}: the vocabulary has no resolution token for {side} tokens"
                )
        longest = int(self.hf_config.max_position_embeddings)
        if height * (width + 1) + len(self.closing_tokens) > longest - MAX_PROMPT_TOKENS:
            raise ValueError(f"image_grid {height}x{width} does not fit {longest} positions with a prompt")

    # ------------------------------------------------------------------ front-end side

    @cached_property
    def image_size(self) -> int:
        """The checkpoint's native (square) size in pixels: zipar.json's `image_size`, else the one size in
        the directory's name (`Lumina-mGPT-7B-768`, `Lumina-mGPT-7B-768-Omni`)."""
        if "image_size" in self.options:
            size = self.options["image_size"]
        else:
            found = re.findall(r"(?<![0-9A-Za-z])(\d{3,4})(?![0-9A-Za-z])", self.model_dir.name)
            if len(found) != 1:
                raise ValueError(
                    f"{self.model_dir}: cannot tell the model's image size from the directory name; write "
                    f'{{"image_size": 768}} (or 512, 1024: the size the checkpoint was trained at) to '
                    f"{OPTIONS_FILE} in the directory"
                )
            size = int(found[0])
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % RESOLUTION_UNIT:
            raise ValueError(
                f"{self.model_dir}: image_size {size!r} must be a positive multiple of 32 pixels"
            )
        return size

    def sizes(self) -> list[ImageSize]:
        native = (self.image_size, self.image_size)
        pairs = [native] + [pair for pair in lumina_crop_sizes(self.image_size) if pair != native]
        return [ImageSize(w, h, (h // DOWNSAMPLE, w // DOWNSAMPLE)) for w, h in pairs]

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        return SAMPLING_DEFAULTS.with_overrides(self.options.get("sampling_defaults", {}))

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir)

    def image_prefix(self, size: ImageSize) -> list[int]:
        """BOI, then the height and the width in 32-pixel units: what Lumina's model emits before the rows."""
        tokens = self.tokens
        rows, cols = size.grid
        units = RESOLUTION_UNIT // DOWNSAMPLE
        return [tokens.boi, tokens.resolution(rows // units), tokens.resolution(cols // units)]

    def prompt_ids(self, prompt: str | int, size: ImageSize) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"a text-to-image prompt must be non-empty text, got {quote(prompt)}")
        question = PROMPT_TEMPLATE.format(width=size.width, height=size.height, prompt=prompt)
        # Conversation.process: the human turn ends with the separator; the empty assistant turn adds none.
        text = self.tokenizer.encode(question + END_OF_TURN_TOKEN, add_special_tokens=False)
        ids = [self.tokens.bos, *text, *self.image_prefix(size)]
        if len(ids) > MAX_PROMPT_TOKENS:
            raise PromptError(
                f"the prompt is {len(ids)} tokens long; this server takes at most {MAX_PROMPT_TOKENS}",
                "prompt_too_long",
            )
        return [int(i) for i in ids]

    @property
    def takes_negative_prompt(self) -> bool:
        return False

    @property
    def unconditional_context(self) -> str:
        return "a context that starts at the image start token, with no text"

    def unconditional_prompt_ids(
        self, negative_prompt: str | None, size: ImageSize, prompt_ids: Sequence[int] | None = None
    ) -> list[int]:
        """Lumina's unconditional context: BOI and the two resolution tokens, from position 0, no text."""
        if negative_prompt is not None:
            raise PromptError(
                "Lumina-mGPT takes no negative prompt: its guidance runs against a context that starts at "
                "the image start token, with no text",
                "unsupported_parameter",
                "negative_prompt",
            )
        return self.image_prefix(size)

    def max_model_len(self) -> int:
        rows, cols = max((s.grid for s in self.sizes()), key=lambda g: g[0] * (g[1] + 1))
        # Both streams of a guided image: prompts, every row with its EOL, plus one KV-only feed per row.
        return 2 * (MAX_PROMPT_TOKENS + rows * (cols + 2))

    def engine_args(self, max_model_len: int | None = None) -> dict[str, Any]:
        from vllm_zipar.models.lumina import lumina_engine_overrides

        return lumina_engine_overrides(self.hf_config, max_model_len or self.max_model_len())

    def vqgan_files(self) -> tuple[Path, Path]:
        """(vqgan.yaml, vqgan.ckpt) of Meta's Chameleon VQGAN: zipar.json's `vqgan_config` and
        `vqgan_checkpoint` (relative to the directory or absolute), else the two files in the directory."""
        config = self.model_dir / self.options.get("vqgan_config", VQGAN_CONFIG)
        checkpoint = self.model_dir / self.options.get("vqgan_checkpoint", VQGAN_CHECKPOINT)
        missing = [str(path) for path in (config, checkpoint) if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Lumina-mGPT decodes pixels with Meta's Chameleon VQGAN, not found: {missing}. Put "
                f"{VQGAN_CONFIG} and {VQGAN_CHECKPOINT} (from Meta's Chameleon release) in {self.model_dir}, "
                f'or name them in {OPTIONS_FILE}: {{"vqgan_config": PATH, "vqgan_checkpoint": PATH}}'
            )
        return config, checkpoint

    def load_decoder(self) -> LuminaPixelDecoder:
        return LuminaPixelDecoder(*self.vqgan_files(), self.visual_tokens)


class LuminaPixelDecoder:
    """Vocabulary ids -> VQ codes (through `vocabulary_map`) -> pixels through Meta's Chameleon VQGAN."""

    def __init__(self, config_path: Path, checkpoint_path: Path, visual: VisualTokens) -> None:
        from vllm_zipar.models.vq.chameleon_vqgan import load_chameleon_vqgan

        self.visual = visual
        self.vqgan = load_chameleon_vqgan(config_path, checkpoint_path)

    def to(self, device) -> LuminaPixelDecoder:
        self.vqgan = self.vqgan.to(device)
        return self

    def to_pil_images(self, grid_ids):
        from vllm_zipar.models.vq.chameleon_vqgan import codes_to_pil

        return codes_to_pil(self.vqgan, self.visual.id_to_code(grid_ids))
