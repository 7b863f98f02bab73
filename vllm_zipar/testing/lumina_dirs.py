"""Tiny random Lumina-mGPT directories in the real on-disk format, for tests and benchmarks.

`write_tiny_lumina_dir` writes what a Hub directory such as `Alpha-VLLM/Lumina-mGPT-7B-768` holds, at toy
sizes and nothing downloaded: `config.json` as Lumina's `ChameleonXLLMXConfig` saves it (`model_type`
"chameleon", the architecture `ChameleonXLLMXForConditionalGeneration`, the legacy `rope_theta`, Lumina's
`model_parallel_size`, `swin_norm`, `mask_image_logits`, `z_loss_weight`, `dropout`, and the tokenizer's
vocabulary as `vocabulary_map`), `model.safetensors` under the keys of Lumina's vendored
`ChameleonForConditionalGeneration` (lumina_mgpt/model/chameleon/modeling_chameleon.py) with the q/k-norm
weights and biases stored `[model_parallel_size, head_dim]` as its `ChameleonLayerNorm` holds them and no
`model.vqmodel.*` keys (Lumina's finetune_solver.py deletes the VQ before saving), the tokenizer files
Lumina's item processor loads (`AutoTokenizer` on the directory: tokenizer.json, tokenizer_config.json), a
`zipar.json` naming the native image size, and a tiny Meta-format `vqgan.yaml` + `vqgan.ckpt` once
`vllm_zipar.testing.chameleon_vqgan_files` exists.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from vllm_zipar.models.lumina_checkpoint import (
    BOI_TOKEN,
    BOS_TOKEN,
    END_OF_TURN_TOKEN,
    EOI_TOKEN,
    EOL_TOKEN,
    EOS_TOKEN,
    IMAGE_PLACEHOLDER_TOKEN,
    PAD_TOKEN,
    RESOLUTION_TOKEN_BASE,
    UNK_TOKEN,
    image_token,
    resolution_token,
)
from vllm_zipar.testing.emu3_dirs import _WORDS

ARCHITECTURE = "ChameleonXLLMXForConditionalGeneration"
MAX_RESOLUTION_UNITS = 64  # resolution tokens <reserved08800>..<reserved08864>: up to 2048 pixels a side
# Lumina's image-layout reserved tokens, contiguous as in Chameleon's vocabulary (<reservedN> is id N + 4
# there, so the resolution tokens follow the EOL token: item_processor.py reads n as id - 8804).
_LAYOUT_RESERVED = [f"<reserved{n:05d}>" for n in range(8796, 8800)] + [
    resolution_token(n) for n in range(MAX_RESOLUTION_UNITS + 1)
]
assert EOL_TOKEN == _LAYOUT_RESERVED[3] and _LAYOUT_RESERVED[4] == f"<reserved{RESOLUTION_TOKEN_BASE:05d}>"


def tiny_lumina_vocab(codebook_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocabulary, BPE merges) of the tiny tokenizer, laid out like Chameleon's at toy size.

    Chameleon's order: `<s>`, `<pad>`, `</s>`, `<unk>`, the image tokens, then BOI/EOI and the reserved
    tokens, then text. Here the image tokens are split in two blocks around `<eoss>` and `<racm3:break>`
    and shuffled in each (a fixed order, the same for every seed), so neither their ids nor their code order
    is contiguous: the id <-> code map must go through `vocabulary_map`. Text is a byte-level BPE that
    spells a few dozen words as single tokens.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + sum(len(w) for w in _WORDS) * 2,
        initial_alphabet=alphabet,
        show_progress=False,
        min_frequency=1,
    )
    trained.train_from_iterator([" ".join(_WORDS)] * 4 + _WORDS, trainer)
    model = json.loads(trained.to_str())["model"]
    text = sorted(model["vocab"], key=model["vocab"].get)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    codes = list(range(codebook_size))
    random.Random(8192).shuffle(codes)
    half = codebook_size // 2
    names = [BOS_TOKEN, PAD_TOKEN, EOS_TOKEN, UNK_TOKEN]
    names += [image_token(c) for c in codes[:half]]
    names += [EOI_TOKEN, BOI_TOKEN]
    names += [image_token(c) for c in codes[half:]]
    names += [END_OF_TURN_TOKEN, IMAGE_PLACEHOLDER_TOKEN, *_LAYOUT_RESERVED]
    names += [t for t in text if t not in set(names)]
    return {name: i for i, name in enumerate(names)}, merges


def build_tiny_lumina_tokenizer(codebook_size: int):
    """The tiny tokenizer (`tiny_lumina_vocab`) as a `PreTrainedTokenizerFast`: BOS/EOS/pad/unk named as in
    Chameleon's tokenizer config, every `<...>` token special (never split), BOS prepended like Llama's."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = tiny_lumina_vocab(codebook_size)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = [name for name in vocab if name.startswith("<") and name.endswith(">") and len(name) > 2]
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in specials])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, 0)]
    )
    assert backend.get_vocab() == vocab, "adding the special tokens must keep their ids"
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def _chameleon_key_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every key of the checkpoint and its shape (Lumina's ChameleonForConditionalGeneration, no VQ)."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads, mp = config["num_key_value_heads"], config["model_parallel_size"]
    head_dim, inner, vocab = hidden // heads, config["intermediate_size"], config["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes[p + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        for norm in ("q_norm", "k_norm"):  # ChameleonLayerNorm([model_parallel_size, head_dim])
            shapes[p + f"self_attn.{norm}.weight"] = (mp, head_dim)
            shapes[p + f"self_attn.{norm}.bias"] = (mp, head_dim)
        shapes[p + "mlp.gate_proj.weight"] = (inner, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inner, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inner)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_tiny_lumina_dir(model_dir: str | Path, *, seed: int = 0, **config_overrides: Any) -> Path:
    """Write a complete random Lumina-mGPT directory; returns its path.

    Defaults: hidden 128, 4 heads of 32, 4 KV heads (Chameleon-7B is multi-head), 2 layers, 64 codes,
    `model_parallel_size` 1, a native size of 128 pixels (8x8 tokens; `image_size`), float32. Any config
    field may be overridden (`model_parallel_size=2`, `swin_norm=True`, `max_position_embeddings`, ...);
    `codebook_size`, `image_size` and `std` are the writer's own. Weights: every matrix normal(0, `std`)
    (Chameleon's 0.02 init makes logits tie and greedy decoding repeat one token); RMSNorm gains near 1;
    q/k-norm weights near 1 and biases near 0 but different for every model-parallel shard, so a wrong
    expansion to the heads changes the logits.
    """
    import torch
    from safetensors.torch import save_file

    overrides = dict(config_overrides)
    codebook_size = int(overrides.pop("codebook_size", 64))
    image_size = int(overrides.pop("image_size", 128))
    std = float(overrides.pop("std", 0.25))
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tiny_lumina_tokenizer(codebook_size)
    vocab = tokenizer.get_vocab()
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": vocab[BOS_TOKEN],
        "dropout": 0.05,
        "eos_token_id": vocab[EOS_TOKEN],
        "hidden_act": "silu",
        "hidden_size": 128,
        "initializer_range": 0.02,
        "intermediate_size": 256,
        "mask_image_logits": False,
        "max_position_embeddings": 4096,
        "mlp_bias": False,
        "model_parallel_size": 1,
        "model_type": "chameleon",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 4,
        "pad_token_id": vocab[PAD_TOKEN],
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "swin_norm": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": len(vocab),
        "vq_config": {
            "attn_resolutions": [],
            "attn_type": "vanilla",
            "base_channels": 32,
            "channel_multiplier": [1, 1, 1, 1, 1],
            "double_latent": False,
            "dropout": 0.0,
            "embed_dim": 8,
            "in_channels": 3,
            "latent_channels": 8,
            "num_embeddings": codebook_size,
            "num_res_blocks": 1,
            "resolution": image_size,
        },
        "vocabulary_map": vocab,
        "z_loss_weight": 1e-05,
    }
    unknown = set(overrides) - set(config)
    if unknown:
        raise TypeError(f"write_tiny_lumina_dir: unknown config fields {sorted(unknown)}")
    config.update(overrides)
    heads, kv_heads, mp = (
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["model_parallel_size"],
    )
    if heads % mp or kv_heads % mp:
        raise ValueError(f"model_parallel_size {mp} must divide the heads {heads} and KV heads {kv_heads}")

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in _chameleon_key_shapes(config).items():
        if key.endswith("_norm.bias"):
            tensor = 0.2 * torch.randn(shape, generator=generator)
        elif key.endswith("norm.weight") or key.endswith("_norm.weight"):
            tensor = 1.0 + 0.2 * torch.randn(shape, generator=generator)
        else:
            tensor = std * torch.randn(shape, generator=generator)
        state[key] = tensor.float().contiguous()
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    generation["pad_token_id"] = config["pad_token_id"]
    (model_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.save_pretrained(model_dir)
    (model_dir / "zipar.json").write_text(json.dumps({"image_size": image_size}, indent=2) + "\n")
    _write_tiny_vqgan(model_dir, codebook_size=codebook_size, seed=seed)
    return model_dir


def _write_tiny_vqgan(model_dir: Path, *, codebook_size: int, seed: int) -> None:
    """Meta's `vqgan.yaml` + `vqgan.ckpt` at toy size, by the VQGAN helper (absent until that branch lands:
    then the directory has no decoder, and `load_decoder` says which files are missing)."""
    try:
        from vllm_zipar.testing.chameleon_vqgan_files import write_tiny_vqgan
    except ImportError:
        return
    write_tiny_vqgan(model_dir, codebook_size=codebook_size, seed=seed)
