"""Janus-Pro text-to-image as an `ImageModel`: a Hugging Face Janus directory, unchanged, served with ZipAR.

Prompts are what transformers builds for `generate(generation_mode="image")`: the processor's chat template
for one user turn with the generation prompt ("<|User|>: {text}\n\n<|Assistant|>:", DeepSeek's sft format
with an empty system prompt), `<begin_of_image>` appended (`JanusProcessor(generation_mode="image")`),
tokenized with BOS. Classifier-free guidance runs against the same prompt with every token other than BOS
and `<begin_of_image>` replaced by pad, attended (transformers' `generate`, DeepSeek's
`generation_inference`); a negative prompt has no place in that rule, so it is refused. One size: the
config's square grid (`vision_config.image_size // patch_size`, 24x24 for 384 px), rows without EOL;
image codes are ids from `text_vocab_size` on (`models/janus.py` routes them to the generation embeddings),
scored by the generation head's columns 0..codebook-1. Defaults: guidance 5, temperature 1, no top-k or
top-p (the converted repositories' generation config and DeepSeek's example); a model directory may
override them in an optional `zipar.json` (`sampling_defaults`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

from vllm_zipar.models.hf_image_model import HFImageModel
from vllm_zipar.models.image_grid import VisualTokens
from vllm_zipar.models.image_prompts import ImageSize, SamplingDefaults
from vllm_zipar.models.janus_checkpoint import JanusTokens, janus_text_vocab_size
from vllm_zipar.models.prompt_error import PromptError, quote

SAMPLING_DEFAULTS = SamplingDefaults(cfg_scale=5.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0)
MAX_PROMPT_TOKENS = 512  # per prompt; bounds max_model_len


class JanusImageModel(HFImageModel):
    family = "Janus-Pro"
    prompt_kind = "text"

    # ------------------------------------------------------------------ engine side

    @property
    def text_vocab_size(self) -> int:
        return janus_text_vocab_size(self.hf_config)

    @property
    def codebook_size(self) -> int:
        return int(self.hf_config.vq_config.num_embeddings)

    @property
    def visual_tokens(self) -> VisualTokens:
        # Code c: generation-head column c, input id text_vocab_size + c.
        return VisualTokens.contiguous(self.text_vocab_size, self.codebook_size, logits_start=0)

    @property
    def input_vocab_size(self) -> int:
        return self.text_vocab_size + self.codebook_size

    @cached_property
    def grid(self) -> tuple[int, int]:
        """The one grid transformers generates and its VQ decodes: image size over patch size, square."""
        vision = self.hf_config.vision_config
        size, patch = vision.image_size, vision.patch_size
        if not isinstance(size, int) or not isinstance(patch, int) or size % patch:
            raise ValueError(
                f"Janus vision_config: image_size {size} must be an int multiple of patch_size {patch}"
            )
        side = size // patch
        if vision.num_image_tokens != side * side:
            raise ValueError(
                f"Janus vision_config: num_image_tokens {vision.num_image_tokens} (what generate() samples)"
                f" is not ({size} // {patch})^2 = {side * side} (what the VQ decodes)"
            )
        return side, side

    @property
    def default_grid(self) -> tuple[int, int]:
        return self.grid

    def check_grid(self, grid: tuple[int, int]) -> None:
        if tuple(grid) != self.grid:
            raise ValueError(
                f"image_grid {grid[0]}x{grid[1]}: this Janus model generates "
                f"{self.grid[0]}x{self.grid[1]} only"
            )

    # ------------------------------------------------------------------ front-end side

    @property
    def downsample(self) -> int:
        """Pixels per code along each side: the VQ decoder upsamples once per level after the first."""
        return 2 ** (len(self.hf_config.vq_config.channel_multiplier) - 1)

    def sizes(self) -> list[ImageSize]:
        rows, cols = self.grid
        return [ImageSize(cols * self.downsample, rows * self.downsample, (rows, cols))]

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        return SAMPLING_DEFAULTS.with_overrides(self.options.get("sampling_defaults", {}))

    @cached_property
    def tokens(self) -> JanusTokens:
        return JanusTokens.from_model_dir(self.model_dir, self.hf_config)

    @cached_property
    def processor(self):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(self.model_dir)

    def prompt_ids(self, prompt: str | int, size: ImageSize) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"a text-to-image prompt must be non-empty text, got {quote(prompt)}")
        processor = self.processor
        conversation = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        # JanusProcessor(generation_mode="image") appends <begin_of_image>; the tokenizer adds BOS.
        ids = list(processor.tokenizer(text + processor.image_start_token)["input_ids"])
        if len(ids) > MAX_PROMPT_TOKENS:
            raise PromptError(
                f"the prompt is {len(ids)} tokens long; this server takes at most {MAX_PROMPT_TOKENS}",
                "prompt_too_long",
            )
        tokens = self.tokens
        if ids[0] != tokens.bos or ids[-1] != tokens.boi:
            raise ValueError(
                f"{self.model_dir}: the generation prompt must run from BOS ({tokens.bos}) to "
                f"<begin_of_image> ({tokens.boi}), got {ids[0]} ... {ids[-1]}"
            )
        return ids

    @property
    def takes_negative_prompt(self) -> bool:
        return False

    @property
    def unconditional_context(self) -> str:
        return "the prompt with its text replaced by padding"

    def unconditional_prompt_ids(
        self, negative_prompt: str | None, size: ImageSize, prompt_ids: Sequence[int] | None = None
    ) -> list[int]:
        """The conditional prompt with every token but BOS and `<begin_of_image>` made pad (transformers'
        `generate(generation_mode="image")`): same length, every position attended."""
        if negative_prompt is not None:
            raise PromptError(
                "Janus-Pro takes no negative prompt: its guidance runs against the prompt with the text "
                "replaced by padding",
                "unsupported_parameter",
                "negative_prompt",
            )
        if prompt_ids is None:
            raise ValueError("Janus-Pro's unconditional prompt pads the conditional one: pass prompt_ids")
        tokens = self.tokens
        return [i if i in (tokens.bos, tokens.boi) else tokens.pad for i in prompt_ids]

    def max_model_len(self) -> int:
        rows, cols = self.grid
        # Both streams of a guided image: prompt and grid, plus one proxy and one KV-only feed per row.
        return 2 * (MAX_PROMPT_TOKENS + rows * (cols + 2))

    def engine_args(self, max_model_len: int | None = None) -> dict[str, Any]:
        from vllm_zipar.models.janus import janus_engine_overrides

        return janus_engine_overrides(self.hf_config, max_model_len or self.max_model_len())

    def load_decoder(self):
        from vllm_zipar.models.vq.janus_vq import JanusPixelDecoder

        return JanusPixelDecoder(self.model_dir, self.visual_tokens)
