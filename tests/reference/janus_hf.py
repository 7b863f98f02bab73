"""transformers' own Janus image generation, the NTP ground truth for the oracle and for engine tests.

``hf_generate_janus_image`` runs ``JanusForConditionalGeneration.generate(generation_mode="image")`` greedily
on one prompt (ids ending with ``<begin_of_image>``). That method always doubles the batch: row 0 the prompt,
row 1 the unconditional prompt it builds itself (every token that is neither BOS nor BOI replaced by pad, the
attention mask unchanged), both fed the same generated codes through ``generation_embeddings`` ->
``generation_aligner``, scores from ``generation_head``. With ``guidance_scale > 1`` it appends
``ClassifierFreeGuidanceLogitsProcessor`` (``u + (c - u) * s`` on the raw scores) and takes the argmax. With
``guidance_scale == 1`` transformers 5.19 skips that processor and then fails writing two rows of argmax into
one row of output; we run it unguided by passing a logits processor that keeps the conditional half of the
scores, so the very same loop, cache and embeddings produce the unguided codes. When sampling, generate()
applies the CFG processor first, then the generation config's temperature / top-k / top-p warpers, then
``torch.multinomial`` (not position-keyed), so only greedy codes are comparable. The grid is square,
``num_image_tokens`` of the vision config (set here from ``side``).
"""

from __future__ import annotations

import torch


class _ConditionalHalf:
    """Logits processor: the conditional rows of generate()'s doubled batch (the CFG-off scores)."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores[: input_ids.shape[0]]


def hf_generate_janus_image(
    model,
    prompt_ids: list[int],
    side: int,
    *,
    bos_id: int,
    pad_id: int,
    boi_id: int,
    guidance_scale: float = 1.0,
    capture_prefill: list | None = None,
) -> torch.Tensor:
    """Greedy codes ``LongTensor[side, side]`` from transformers' ``generate(generation_mode="image")``.

    ``capture_prefill``, if given, receives the ``inputs_embeds`` (``[2, P, hidden]``, conditional row
    first) of the first language-model call, to check the unconditional prompt generate() builds."""
    from transformers import GenerationConfig, LogitsProcessorList

    if guidance_scale < 1:
        raise ValueError(f"guidance_scale={guidance_scale} must be >= 1")
    model.config.vision_config.num_image_tokens = side * side
    model.model.vision_model.config.num_image_tokens = side * side
    config = GenerationConfig(
        bos_token_id=bos_id,
        pad_token_id=pad_id,
        do_sample=False,
        guidance_scale=guidance_scale,
        generation_kwargs={"boi_token_id": boi_id},
    )
    processors = LogitsProcessorList([_ConditionalHalf()]) if guidance_scale == 1 else None
    handle = None
    if capture_prefill is not None:

        def grab(module, args, kwargs):
            if not capture_prefill:
                capture_prefill.append(kwargs["inputs_embeds"].detach().clone())

        handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                generation_mode="image",
                generation_config=config,
                logits_processor=processors,
            )
    finally:
        if handle is not None:
            handle.remove()
    return out[0].view(side, side)
