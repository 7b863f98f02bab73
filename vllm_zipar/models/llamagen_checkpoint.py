"""Reading, checking and writing LlamaGen GPT checkpoints in the authors' own `.pt` layouts.

The authors save GPT weights three ways (autoregressive/sample/sample_c2i.py and train_c2i*.py in
FoundationVision/LlamaGen): under `"model"` (training checkpoints, next to an `argparse.Namespace` under
`"args"`), under `"state_dict"`, or as a raw (FSDP-consolidated) dict of tensors. All carry the parameter
names of their `Transformer`; some also carry the `freqs_cis` buffer, which is derived and dropped here.
Loading never unpickles arbitrary objects: `weights_only=True` with only `argparse.Namespace` allowed.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import torch

from vllm_zipar.models.llamagen_config import LlamaGenConfig

torch.serialization.add_safe_globals([argparse.Namespace])

# Top-level keys of the authors' wrapped layouts, in the order their sampling script looks for them.
WRAPPER_KEYS = ("model", "module", "state_dict")
DERIVED_KEYS = ("freqs_cis",)


def unwrap_authors_layout(checkpoint: Mapping[str, object], path: str | Path) -> dict[str, torch.Tensor]:
    """The GPT parameters inside any of the authors' layouts, minus derived buffers."""
    state: Mapping[str, object] = checkpoint
    for key in WRAPPER_KEYS:
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping):
            state = inner
            break
    tensors = {}
    for name, value in state.items():
        if name in DERIVED_KEYS:
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        tensors[name] = value
    return tensors


def load_gpt_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load the authors' GPT `.pt` (any layout) on the CPU."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint, found {type(checkpoint).__name__}")
    return unwrap_authors_layout(checkpoint, path)


def expected_gpt_shapes(config: LlamaGenConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name of the authors' c2i `Transformer`, with its shape, for `config`."""
    dim, head_dim = config.dim, config.rope_head_dim
    qkv_rows = (config.n_head + 2 * config.n_kv_head) * head_dim
    ffn = config.ffn_hidden_dim
    shapes: dict[str, tuple[int, ...]] = {
        "cls_embedding.embedding_table.weight": (config.num_class_embeddings, dim),
        "tok_embeddings.weight": (config.codebook_size, dim),
        "norm.weight": (dim,),
        "output.weight": (config.codebook_size, dim),
    }
    for i in range(config.n_layer):
        p = f"layers.{i}."
        shapes[p + "attention.wqkv.weight"] = (qkv_rows, dim)
        shapes[p + "attention.wo.weight"] = (dim, config.n_head * head_dim)
        shapes[p + "feed_forward.w1.weight"] = (ffn, dim)
        shapes[p + "feed_forward.w3.weight"] = (ffn, dim)
        shapes[p + "feed_forward.w2.weight"] = (dim, ffn)
        shapes[p + "attention_norm.weight"] = (dim,)
        shapes[p + "ffn_norm.weight"] = (dim,)
    return shapes


def check_gpt_state_dict(state: Mapping[str, torch.Tensor], config: LlamaGenConfig, path: str | Path) -> None:
    """Raise a ValueError naming the file and every missing, unexpected or mis-shaped key."""
    expected = expected_gpt_shapes(config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{name} (expected {tuple(expected[name])}, found {tuple(state[name].shape)})"
        for name in sorted(set(expected) & set(state))
        if tuple(state[name].shape) != expected[name]
    ]
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if misshaped:
        problems.append("mis-shaped keys: " + ", ".join(misshaped))
    if problems:
        raise ValueError(
            f"GPT checkpoint {path} does not match its config.json "
            f"(dim {config.dim}, {config.n_layer} layers, {config.n_head} heads): " + "; ".join(problems)
        )


def random_gpt_state_dict(
    config: LlamaGenConfig, seed: int = 0, std: float = 0.25
) -> dict[str, torch.Tensor]:
    """Random weights under the authors' names.

    The authors' init zeroes `output.weight`, which makes every logit 0. Random tests need distinct logits,
    so matrices are drawn with standard deviation 4·std/sqrt(fan_in) and norms near one; `std` is chosen so
    that greedy decoding of a tiny model visits many tokens instead of repeating one.
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_gpt_shapes(config).items():
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif "embedding" in name:
            state[name] = torch.randn(shape, generator=gen)
        else:
            fan_in = shape[1]
            state[name] = torch.randn(shape, generator=gen) * (std * 4.0 / fan_in**0.5)
    return state


def save_gpt_checkpoint(
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    layout: str = "model",
    config: LlamaGenConfig | None = None,
) -> None:
    """Write `state` in an authors' layout: "model" (with `args` and `steps`), "state_dict" or "raw"."""
    state = {k: v.contiguous() for k, v in state.items()}
    if layout == "model":
        args = argparse.Namespace(
            gpt_model=getattr(config, "gpt_model", None) or "custom",
            gpt_type="c2i",
            image_size=getattr(config, "image_size", None),
            downsample_size=getattr(config, "downsample", None),
            cls_token_num=getattr(config, "cls_token_num", 1),
        )
        payload: dict[str, object] = {"model": state, "steps": 0, "args": args}
    elif layout == "state_dict":
        payload = {"state_dict": state}
    elif layout == "raw":
        payload = dict(state)
    else:
        raise ValueError(f"unknown layout {layout!r}; expected 'model', 'state_dict' or 'raw'")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
