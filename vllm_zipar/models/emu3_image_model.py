"""Emu3-Gen text-to-image as an `ImageModel`: a Hugging Face Emu3 directory, unchanged, served with ZipAR.

Prompts follow transformers' `Emu3Processor(..., return_for_image_generation=True)`: BOS + text +
`<|image start|>` + "H*W" + `<|image token|>`, tokenized by the model's own tokenizer; every row of W visual
tokens ends with the EOL token `<|extra_200|>`, and EOF, image end and EOS close the image (forced, never
sampled). Sizes are the processor's: an aspect ratio at a fixed pixel area (518,400 = 720x720, 90x90
tokens; a tokenizer config may set its own `image_area`, the processor's default), downsampled 8x.
Guidance runs against a negative prompt (its own length); defaults follow the Emu3 authors' generation
example (BAAI/Emu3 `image_generation.py`): scale 3.0, top-k 2048, a quality suffix on the prompt and a fixed
negative prompt. A model directory may override them in an optional `zipar.json` (`image_area`, `ratios`,
`positive_prompt_suffix`, `negative_prompt`, `sampling_defaults`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from vllm_zipar.models.emu3_checkpoint import BOI_TOKEN, IMAGE_WRAPPER_TOKEN, Emu3Tokens
from vllm_zipar.models.hf_image_model import HFImageModel
from vllm_zipar.models.image_grid import VisualTokens
from vllm_zipar.models.image_prompts import ImageSize, SamplingDefaults
from vllm_zipar.models.prompt_error import PromptError, quote

DOWNSAMPLE = 8  # Emu3VQVAE: 8x8 pixels per token (Emu3Processor.downsample_ratio)
IMAGE_AREA = 518_400  # Emu3Processor's default image_area: 720x720 at ratio 1:1
RATIOS = ("1:1", "4:3", "3:4", "16:9", "9:16")
POSITIVE_PROMPT_SUFFIX = " masterpiece, film grained, best quality."
NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
)
SAMPLING_DEFAULTS = SamplingDefaults(cfg_scale=3.0, cfg_interval=-1, temperature=1.0, top_k=2048, top_p=1.0)
MAX_PROMPT_TOKENS = 512  # per prompt; bounds max_model_len


def generate_grid(ratio: str, image_area: int, downsample: int = DOWNSAMPLE) -> tuple[int, int]:
    """(rows, columns) of tokens for a "W:H" ratio at `image_area` pixels, as Emu3Processor computes them
    (`calculate_generate_size`, transformers/models/emu3/processing_emu3.py)."""
    width, height = map(int, ratio.split(":"))
    scale = (image_area / (width * height)) ** 0.5
    return int(round(height * scale / downsample)), int(round(width * scale / downsample))


class Emu3ImageModel(HFImageModel):
    family = "Emu3"
    prompt_kind = "text"

    option_keys = frozenset(
        {"image_area", "ratios", "positive_prompt_suffix", "negative_prompt", "sampling_defaults"}
    )

    # ------------------------------------------------------------------ engine side

    @cached_property
    def tokens(self) -> Emu3Tokens:
        return Emu3Tokens.from_config(self.hf_config)

    @property
    def visual_tokens(self) -> VisualTokens:
        return VisualTokens.contiguous(self.tokens.visual_start, self.tokens.codebook_size)

    @property
    def input_vocab_size(self) -> int:
        return int(self.hf_config.text_config.vocab_size)

    @property
    def eol_token(self) -> int:
        return self.tokens.eol

    @property
    def closing_tokens(self) -> tuple[int, ...]:
        """Emu3's tokens after the last row's EOL (EOF, image end, EOS): never sampled or fed (the engine
        ends an image at its last cell), but they count against the model's positions."""
        return self.tokens.eof, self.tokens.eoi, self.tokens.eos

    @property
    def default_grid(self) -> tuple[int, int]:
        return self.native_size.grid

    def check_grid(self, grid: tuple[int, int]) -> None:
        # Any grid whose tokens fit the model's positions (the front-end offers the processor's sizes).
        height, width = grid
        longest = int(self.hf_config.text_config.max_position_embeddings)
        if height * (width + 1) + len(self.closing_tokens) > longest - MAX_PROMPT_TOKENS:
            raise ValueError(f"image_grid {height}x{width} does not fit {longest} positions with a prompt")

    # ------------------------------------------------------------------ front-end side

    @cached_property
    def image_area(self) -> int:
        """Pixels of a generated image: zipar.json, else the tokenizer config's (the processor's default)."""
        if "image_area" in self.options:
            return int(self.options["image_area"])
        path = self.model_dir / "tokenizer_config.json"
        tokenizer_config = json.loads(path.read_text()) if path.is_file() else {}
        return int(tokenizer_config.get("image_area", IMAGE_AREA))

    def sizes(self) -> list[ImageSize]:
        area = self.image_area
        sizes: list[ImageSize] = []
        for ratio in self.options.get("ratios", RATIOS):
            rows, cols = generate_grid(ratio, area)
            size = ImageSize(cols * DOWNSAMPLE, rows * DOWNSAMPLE, (rows, cols))
            if rows >= 1 and cols >= 1 and size not in sizes:
                sizes.append(size)
        if not sizes:
            raise ValueError(f"no image size fits image_area {area}")
        return sizes

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        return SAMPLING_DEFAULTS.with_overrides(self.options.get("sampling_defaults", {}))

    @property
    def takes_negative_prompt(self) -> bool:
        return True

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir)

    def _image_prompt(self, text: str, size: ImageSize) -> list[int]:
        """Token ids of Emu3Processor's generation prompt for `text` at `size` (BOS added as it does)."""
        rows, cols = size.grid
        tokenizer = self.tokenizer
        text = f"{tokenizer.bos_token}{text}{BOI_TOKEN}{rows}*{cols}{IMAGE_WRAPPER_TOKEN}"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > MAX_PROMPT_TOKENS:
            raise PromptError(
                f"the prompt is {len(ids)} tokens long; this server takes at most {MAX_PROMPT_TOKENS}",
                "prompt_too_long",
            )
        return list(ids)

    def prompt_ids(self, prompt: str | int, size: ImageSize) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"a text-to-image prompt must be non-empty text, got {quote(prompt)}")
        suffix = self.options.get("positive_prompt_suffix", POSITIVE_PROMPT_SUFFIX)
        return self._image_prompt(prompt + suffix, size)

    def unconditional_prompt_ids(
        self, negative_prompt: str | None, size: ImageSize, prompt_ids: Sequence[int] | None = None
    ) -> list[int]:
        if negative_prompt is None:
            negative_prompt = self.options.get("negative_prompt", NEGATIVE_PROMPT)
        try:
            return self._image_prompt(negative_prompt, size)
        except PromptError as err:
            raise PromptError(
                str(err).replace("the prompt", "the negative prompt"), err.code, "negative_prompt"
            ) from None

    def max_model_len(self) -> int:
        rows, cols = max((s.grid for s in self.sizes()), key=lambda g: g[0] * (g[1] + 1))
        # Both streams of a guided image: prompt, every row with its EOL, plus one KV-only feed per row.
        return 2 * (MAX_PROMPT_TOKENS + rows * (cols + 2))

    def engine_args(self, max_model_len: int | None = None) -> dict[str, Any]:
        from vllm_zipar.models.emu3 import emu3_engine_overrides

        return emu3_engine_overrides(self.hf_config, max_model_len or self.max_model_len())

    def load_decoder(self) -> Emu3PixelDecoder:
        return Emu3PixelDecoder(self.model_dir, self.visual_tokens)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "negative_prompt_default": self.options.get("negative_prompt", NEGATIVE_PROMPT),
        }


class Emu3PixelDecoder:
    """Vocabulary ids -> VQ codes -> pixels through transformers' `Emu3VQVAE` (not re-implemented)."""

    def __init__(self, model_dir: Path, visual: VisualTokens) -> None:
        from vllm_zipar.models.vq.emu3_vq import load_emu3_vq

        self.visual = visual
        self.vq = load_emu3_vq(model_dir)

    def to(self, device) -> Emu3PixelDecoder:
        self.vq.model = self.vq.model.to(device)
        return self

    def to_pil_images(self, grid_ids):
        from vllm_zipar.models.vq.emu3_vq import codes_to_pil

        return codes_to_pil(self.vq, self.visual.id_to_code(grid_ids))
