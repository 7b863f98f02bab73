"""The vLLM engine arguments an image model is served with, and the order in which they are decided.

Four layers, each on top of the one before: what every image model needs (our scheduler and worker, the
decoding default, no tokenizer, eager mode), the platform's defaults (`default_dtype`, a fixed CPU KV cache),
the family's own (`ImageModel.engine_args()`: lengths, architecture; a longer sequence when the default
decoding has exact drafts or the user a longer one, `served_max_model_len`), and last what the user gave
(`vllm serve` flags, `ImageGenerator` keyword arguments): a user's value always wins. `hf_overrides` is the
one argument merged instead of replaced (`merge_hf_overrides`): the family's entries are what make vLLM
build our model class with the right lengths, so the user's go on top of them, key by key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Protocol

from vllm_zipar.engine.request_config import ImageDecoding
from vllm_zipar.models.image_model import ImageModel

# A child of vLLM's "vllm" logger: its handler, format and level once vLLM has configured logging.
logger = logging.getLogger("vllm.zipar.engine_args")

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
# Exact drafts keep every superseded guess in the request's KV sequence. Measured (docs/exact_drafts.md §8,
# §10) an image with L drafts supersedes about 1.8 / 3.1 / 4.5 slots per cell at L = 2 / 4 / 8 on random
# weights, fewer on the trained digits model: L slots per cell and stream covers that (the scheduler cuts
# drafts to what is left, so a short sequence costs passes, never tokens).
DRAFT_SLOTS_PER_CELL_PER_DRAFT = 1
BF16_MIN_CAPABILITY = 80  # Ampere: vLLM's CUDA platform refuses bfloat16 below compute capability 8.0


class Platform(Protocol):
    """The part of vLLM's `current_platform` the defaults read."""

    def is_cpu(self) -> bool: ...

    def is_cuda(self) -> bool: ...

    def has_device_capability(self, capability: int) -> bool: ...


class HfOverridesError(ValueError):
    """A user's `hf_overrides` that would stop the engine from building our model class."""


def default_dtype(platform: Platform) -> str:
    """The weights' dtype when the user gives none: bfloat16 on a CUDA device that has it, else float32.

    float32 on vLLM's CPU platform: bf16 there may select an AMX attention kernel that dies with SIGILL on
    CPUs without AMX, and our masked CPU kernel is tested in float32. Other platforms (and CUDA devices
    before Ampere, where bf16 is refused) keep float32 too: it is the dtype every oracle test runs in.
    """
    if platform.is_cuda() and platform.has_device_capability(BF16_MIN_CAPABILITY):
        return "bfloat16"
    return "float32"


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `top`'s entries on top; where both hold a dict under a key, those are merged the same way
    (lists and other values of `top` replace `base`'s)."""
    merged = dict(base)
    for key, value in top.items():
        below = merged.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            merged[key] = deep_merge(below, value)
        else:
            merged[key] = value
    return merged


def merge_hf_overrides(
    family: Mapping[str, Any], user: Mapping[str, Any], architectures: list[str] | None
) -> dict[str, Any]:
    """The family's `hf_overrides` with the user's on top (nested dicts key by key).

    `architectures` is what selects our model class (`models/registry.py`'s `VLLM_MODEL_CLASSES`); a user
    value other than the served one is refused rather than applied: vLLM would build another class (or its
    stock model) that does not decode ZipAR steps, which fails late and obscurely or decodes wrong tokens.
    To run vLLM's own model on the directory, serve it without `--decoding` instead.
    """
    given = user.get("architectures")
    if given is not None and architectures is not None and list(given) != list(architectures):
        raise HfOverridesError(
            f"hf_overrides sets architectures={given!r}, but this model directory is served by "
            f"{architectures!r} (the vllm-zipar model class); drop 'architectures' from hf_overrides"
        )
    return deep_merge(family, user)


def served_architectures(model: ImageModel, family_hf_overrides: Mapping[str, Any]) -> list[str] | None:
    """The architecture list vLLM selects our model class by: the family's override, else the config's."""
    if "architectures" in family_hf_overrides:
        return list(family_hf_overrides["architectures"])
    found = getattr(model.hf_config, "architectures", None)
    return list(found) if found else None


def largest_grid_cells(model: ImageModel) -> int:
    """Grid positions of the model's largest size (EOL columns counted for every family: an upper bound)."""
    return max(rows * (cols + 1) for rows, cols in (size.grid for size in model.sizes()))


def draft_headroom(model: ImageModel, drafts: int) -> int:
    """KV slots beyond plain ZipAR's that a guided image of the largest size with `drafts` per pass needs
    for its superseded tokens (both streams)."""
    return 2 * drafts * DRAFT_SLOTS_PER_CELL_PER_DRAFT * largest_grid_cells(model)


def drafts_that_fit(model: ImageModel, max_model_len: int) -> int:
    """The largest L whose superseded tokens fit a guided image of the largest size in `max_model_len`
    (0: none; `draft_headroom`'s estimate)."""
    room = max_model_len - model.max_model_len()
    return max(0, room // draft_headroom(model, 1))


def served_max_model_len(
    model: ImageModel, decoding: ImageDecoding, overrides: Mapping[str, Any]
) -> int | None:
    """The sequence length the family's engine arguments are built for (None: the family's own).

    A user's `max_model_len` is taken as given (the family lifts its position cap to match, so no
    `hf_overrides` are needed), with a warning when the engine's default drafts do not fit it. Without one,
    an engine whose default decoding has drafts gets the family's length plus `draft_headroom`: the
    family's is sized for plain ZipAR, and drafts cut to fit it would save almost no passes."""
    plain = model.max_model_len()
    given = overrides.get("max_model_len")
    if given is not None:
        fit = drafts_that_fit(model, int(given))
        if decoding.drafts and fit < decoding.drafts:
            logger.warning(
                "zipar_drafts=%d with max_model_len=%d: a guided image of the largest size has room for "
                "about %d drafts per pass (superseded guesses fill its KV sequence), so the scheduler will "
                "cut drafts (tokens stay exact, fewer passes are saved); max_model_len=%d fits them",
                decoding.drafts,
                given,
                fit,
                plain + draft_headroom(model, decoding.drafts),
            )
        return int(given)
    if not decoding.drafts:
        return None
    raised = plain + draft_headroom(model, decoding.drafts)
    logger.info(
        "zipar_drafts=%d: max_model_len raised from %d to %d (a draft image's KV sequence also holds its "
        "superseded guesses); pass max_model_len to choose another",
        decoding.drafts,
        plain,
        raised,
    )
    return raised


def image_engine_args(
    model: ImageModel,
    decoding: ImageDecoding,
    overrides: Mapping[str, Any],
    platform: Platform | None = None,
) -> dict[str, Any]:
    """vLLM engine arguments for serving `model` with our scheduler, worker and decoding default; `overrides`
    (the user's) win, except that `hf_overrides` is merged with the family's (`merge_hf_overrides`)."""
    from vllm_zipar.engine import SCHEDULER_CLS, worker_cls_name

    if platform is None:
        from vllm.platforms import current_platform

        platform = current_platform
    family = model.engine_args(served_max_model_len(model, decoding, overrides))
    kwargs: dict[str, Any] = {
        "model": str(model.model_dir),
        "skip_tokenizer_init": True,  # prompts reach the engine as token ids (the front-end tokenizes)
        "dtype": default_dtype(platform),
        "worker_cls": worker_cls_name(),
        "scheduler_cls": SCHEDULER_CLS,
        "additional_config": {
            "zipar": {"decoding": decoding.decoding, "window": decoding.window}
            | ({"drafts": decoding.drafts} if decoding.drafts else {})
        },
        "enforce_eager": True,  # no CUDA graphs or torch.compile for the masked steps
    }
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ and "gpu_memory_utilization" not in overrides:
        if platform.is_cpu():
            # vLLM sizes the CPU KV cache from the NUMA node minus this process's memory; its 0.92 default
            # does not fit next to the model, and a fraction shrinks as the process grows. A fixed size is
            # predictable (1 GiB holds ~1,700 LlamaGen-B images of 24x24 tokens).
            kwargs["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_BYTES
    kwargs.update(family)
    kwargs.update(overrides)
    family_hf = family.get("hf_overrides") or {}
    user_hf = overrides.get("hf_overrides")
    if user_hf is not None:
        if callable(user_hf):
            if family_hf:  # vLLM takes a dict or a function, never both
                raise HfOverridesError(
                    f"a callable hf_overrides cannot be merged with this family's {family_hf!r}; pass a dict"
                )
        else:
            kwargs["hf_overrides"] = merge_hf_overrides(
                family_hf, user_hf, served_architectures(model, family_hf)
            )
    return kwargs
