"""transformers' own Emu3 image generation, the NTP ground truth for the oracle and for engine tests.

``hf_generate_image`` runs ``Emu3ForConditionalGeneration.generate()`` greedily with the Emu3 logits
constraints written as transformers' Emu3 docs write them (a ``prefix_allowed_tokens_fn`` counting from the
image wrapper token ``<|image token|>``: visual tokens inside a row, EOL at column W, then EOF, image end,
EOS, then padding). With ``guidance_scale != 1`` transformers adds
``UnbatchedClassifierFreeGuidanceLogitsProcessor`` before the constraint:
``s * (log_softmax(c) - log_softmax(u)) + log_softmax(u)``, which differs from ``u + s * (c - u)`` by a
constant per row, so greedy picks agree up to float rounding. The unconditional sequence is the negative
prompt at positions 0..U-1 followed by the same generated tokens, EOLs included. generate() spends one
forward pass per EOL and closing token, unlike the fused NTP baseline (ZIPAR.md §4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Emu3SpecialIds:
    image_wrapper: int  # <|image token|>, the last prompt token
    eol: int  # <|extra_200|>
    eof: int  # <|extra_201|>
    image_end: int  # <|image end|>
    eos: int
    pad: int
    visual: tuple[int, int]  # contiguous [start, stop) of the visual tokens


def emu3_prefix_allowed_tokens(
    H: int, W: int, ids: Emu3SpecialIds
) -> Callable[[int, torch.Tensor], list[int]]:
    """The ``prefix_allowed_tokens_fn`` of an ``H x W`` image (one prompt with one image wrapper token)."""
    visual = list(range(*ids.visual))

    def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        offset = int(input_ids.shape[0] - torch.nonzero(input_ids == ids.image_wrapper)[0, 0])
        if offset % (W + 1) == 0:
            return [ids.eol]
        tail = offset - (W + 1) * H
        if tail > 0:
            return [ids.eof, ids.image_end, ids.eos][tail - 1 : tail] or [ids.pad]
        return visual

    return allowed


def hf_generate_image(
    model,
    prompt_ids: list[int],
    H: int,
    W: int,
    ids: Emu3SpecialIds,
    *,
    negative_prompt_ids: list[int] | None = None,
    guidance_scale: float = 1.0,
) -> list[int]:
    """Greedy ``generate()``; returns the generated ids: ``H`` rows of ``W`` visual tokens + EOL, then EOF,
    image end, EOS (``H * (W + 1) + 3`` ids when the constraints hold)."""
    extra = {}
    if guidance_scale != 1.0:
        if not negative_prompt_ids:
            raise ValueError("guidance_scale != 1 needs negative_prompt_ids")
        extra = {"negative_prompt_ids": torch.tensor([negative_prompt_ids]), "guidance_scale": guidance_scale}
    out = model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=H * (W + 1) + 3,
        do_sample=False,
        prefix_allowed_tokens_fn=emu3_prefix_allowed_tokens(H, W, ids),
        eos_token_id=ids.eos,
        pad_token_id=ids.pad,
        **extra,
    )
    return out[0, len(prompt_ids) :].tolist()
