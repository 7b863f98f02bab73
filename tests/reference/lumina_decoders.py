"""Reference NTP and ZipAR decoders for Lumina-mGPT: its image layout on top of the EOL-grid oracle.

Lumina-mGPT (Alpha-VLLM/Lumina-mGPT ``lumina_mgpt/inference_solver.py``, ``data/item_processor.py``)
writes an image as BOI ``<racm3:break>``, a height and a width token (32-px units), then ``H`` rows of ``W``
image tokens each followed by the EOL ``<reserved08799>``, then EOI ``<eoss>``. Here the text prompt (ids,
built by the caller) is followed by the forced ``[BOI, h, w]``, so the conditional stream's prompt is
``P = len(prompt) + 3`` ids and cell ``(r, c)`` sits at ``P + r * (W + 1) + c``; the rows are decoded by
``emu3_decoders.ntp_decode_eol`` / ``zipar_decode_eol`` (ZIPAR.md §1-5; window ``w``: row ``r + 1`` starts
in the first pass after row ``r`` holds ``>= w`` tokens, fed row ``r``'s EOL). Image tokens are sampled
from the image tokens only, through their vocabulary ids in code order (``LuminaImageIds.visual``, from
``vocabulary_map``), and the code index is the noise's vocabulary index. CFG follows Lumina's
``LLMImageStartTriggeredUnbatchedClassifierFreeGuidanceLogitsProcessor``: the unconditional context is
``input_ids[:, boi_index:]``, i.e. ``[BOI, h, w]`` at positions 0..2 with no text, fed the same image tokens
and EOLs; guidance mixes raw logits ``u + s * (c - u)`` (Lumina: ``s * (scores - u) + u`` before its
image-token constraint and top-k). Returns grids of vocabulary ids; the closing tokens (the last row's EOL,
EOI) are forced and never fed.
"""

from __future__ import annotations

import torch

from .emu3_decoders import EolModel, ntp_decode_eol, teacher_forced_gaps, zipar_decode_eol
from .lumina_model import LuminaImageIds


def lumina_prompts(
    prompt_ids: list[int], H: int, W: int, ids: LuminaImageIds, cfg_scale: float
) -> tuple[list[int], list[int] | None]:
    """(conditional prompt ``prompt + [BOI, h, w]``, unconditional context ``[BOI, h, w]`` or None without
    guidance)."""
    prefix = ids.image_prefix(H, W)
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: Lumina's image follows a text prompt")
    return list(prompt_ids) + prefix, (prefix if cfg_scale != 1.0 else None)


def _kw(ids: LuminaImageIds, uncond: list[int] | None, cfg_scale: float) -> dict:
    return {
        "eol_id": ids.eol,
        "visual": list(ids.visual),
        "negative_prompt_ids": uncond,
        "cfg_scale": cfg_scale,
    }


def lumina_ntp_decode(
    model: EolModel,
    prompt_ids: list[int],
    H: int,
    W: int,
    ids: LuminaImageIds,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Raster-order NTP; returns (grid ``LongTensor[H, W]`` of image-token vocabulary ids, ``H * W``
    passes)."""
    cond, uncond = lumina_prompts(prompt_ids, H, W, ids, cfg_scale)
    return ntp_decode_eol(
        model,
        cond,
        H,
        W,
        **_kw(ids, uncond, cfg_scale),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )


def lumina_zipar_decode(
    model: EolModel,
    prompt_ids: list[int],
    H: int,
    W: int,
    window: int,
    ids: LuminaImageIds,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    **hooks,
) -> tuple[torch.Tensor, int]:
    """ZipAR with window ``window``; returns (grid of vocabulary ids, passes ``(H - 1) * min(window, W) + W``,
    prefill included). ``hooks``: ``zipar_decode_eol``'s test hooks (``_trace``, ``_feed_time``, ...)."""
    cond, uncond = lumina_prompts(prompt_ids, H, W, ids, cfg_scale)
    return zipar_decode_eol(
        model,
        cond,
        H,
        W,
        window,
        **_kw(ids, uncond, cfg_scale),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        **hooks,
    )


def lumina_teacher_forced_gaps(
    model: EolModel,
    prompt_ids: list[int],
    grid: torch.Tensor,
    window: int,
    ids: LuminaImageIds,
    *,
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """ZIPAR.md §6: per cell, the oracle's best image-token logit minus the logit of ``grid``'s token when the
    ZipAR-``window`` passes are fed ``grid`` (``float32[H, W]``; < 1e-3 for an exact run up to near-ties)."""
    H, W = grid.shape
    cond, uncond = lumina_prompts(prompt_ids, H, W, ids, cfg_scale)
    return teacher_forced_gaps(model, cond, grid, window, **_kw(ids, uncond, cfg_scale))


def lumina_image_sequence(grid: torch.Tensor, ids: LuminaImageIds) -> list[int]:
    """The ids Lumina generates after the prompt for ``grid``: ``[BOI, h, w]``, each row + EOL, then EOI."""
    H, W = grid.shape
    body = torch.cat([grid, torch.full((H, 1), ids.eol, dtype=grid.dtype)], dim=1).flatten().tolist()
    return ids.image_prefix(H, W) + body + [ids.eoi]
