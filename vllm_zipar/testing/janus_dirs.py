"""Tiny random Janus-Pro directories in the real Hugging Face layout, for tests and benchmarks.

`write_random_janus_dir` writes what `JanusForConditionalGeneration.save_pretrained` and `JanusProcessor`
write for `deepseek-community/Janus-Pro-1B` (config, generation config, safetensors, tokenizer, processor and
image-processor configs with the chat template) at toy sizes, nothing downloaded; the tokenizer is a
byte-level BPE that adds BOS, with DeepSeek's special tokens (`build_tiny_janus_tokenizer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm_zipar.models.janus_checkpoint import (
    ASSISTANT_TOKEN,
    BOI_TOKEN,
    BOS_TOKEN,
    EOI_TOKEN,
    EOS_TOKEN,
    EXTRA_SPECIAL_TOKENS,
    IMAGE_TOKEN,
    PAD_TOKEN,
    USER_TOKEN,
)
from vllm_zipar.testing.emu3_dirs import _WORDS

# The chat template the converted Janus-Pro repositories carry (transformers'
# models/janus/convert_janus_weights_to_hf.py, CHAT_TEMPLATE): "<|User|>: {text}\n\n<|Assistant|>:".
CHAT_TEMPLATE = (
    "{%set seps=['\n\n','<\uff5cend\u2581of\u2581sentence\uff5c>']%}"
    "{%set i=0%}"
    "{%for message in messages%}"
    "{%if message['role']|lower=='user'%}"
    "<|User|>: "
    "{%elif message['role']|lower=='assistant'%}"
    "<|Assistant|>:{%if not (loop.last and not add_generation_prompt and "
    "message['content'][0]['type']=='text' and message['content'][0]['text']=='')%} {%endif%}"
    "{%else%}"
    "{{message['role'].capitalize()}}: "
    "{%endif%}"
    "{%for content in message['content']%}"
    "{%if content['type']=='image'%}"
    "{%if not loop.first%}{{'\n'}}{%endif%}"
    "<image_placeholder>"
    "{%if not loop.last%}{{'\n'}}{%endif%}"
    "{%elif content['type']=='text'%}"
    "{%set text=content['text']%}"
    "{%if loop.first%}{%set text=text.lstrip()%}{%endif%}"
    "{%if loop.last%}{%set text=text.rstrip()%}{%endif%}"
    "{%if not loop.first and message['content'][loop.index0-1]['type']=='text'%}"
    "{{' '+text}}"
    "{%else%}"
    "{{text}}"
    "{%endif%}"
    "{%endif%}"
    "{%endfor%}"
    "{%if not loop.last or add_generation_prompt%}"
    "{%if message['role']|lower=='user'%}"
    "{{seps[0]}}"
    "{%else%}"
    "{{seps[1]}}"
    "{%endif%}"
    "{%endif%}"
    "{%endfor%}"
    "{%if add_generation_prompt%}<|Assistant|>:{%endif%}"
)


def build_tiny_janus_tokenizer():
    """A byte-level BPE tokenizer shaped like DeepSeek's: text (bytes + a few words), then the special tokens
    Janus uses; like the real one it prepends BOS to every encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    merges = sum(len(w) for w in _WORDS) * 2
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + merges, initial_alphabet=alphabet, show_progress=False, min_frequency=1
    )
    backend.train_from_iterator([" ".join(_WORDS)] * 4 + _WORDS, trainer)
    specials = [
        BOS_TOKEN,
        EOS_TOKEN,
        PAD_TOKEN,
        IMAGE_TOKEN,
        BOI_TOKEN,
        EOI_TOKEN,
        USER_TOKEN,
        ASSISTANT_TOKEN,
    ]
    backend.add_special_tokens(specials)
    bos = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=dict(EXTRA_SPECIAL_TOKENS),
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def write_random_janus_dir(
    model_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    rope_theta: float = 10_000.0,
    grid: int = 8,
    codebook_size: int = 64,
    code_dim: int = 8,
    vq_base_channels: int = 32,
    vq_channel_multiplier: tuple[int, ...] = (1, 2),
    vq_num_res_blocks: int = 1,
    std: float = 0.25,
) -> Any:
    """Write a complete random Janus-Pro directory in the Hugging Face layout; returns its `JanusConfig`.

    The generated grid is `grid` x `grid` (vision `image_size // patch_size`, as transformers reads it) of a
    `codebook_size`-code VQ with `len(vq_channel_multiplier) - 1` halvings (the real one: 5 levels, 16x,
    384 px -> 24x24); the vision config's patch equals the VQ's downsampling, so pixels and grid agree as
    in the real model. Text and generation-path weights are normal(0, `std`), float32 (transformers' 0.02
    makes every logit tie, so greedy decoding repeats one code), the code embeddings normal(0, 1) and the
    head's rows centred (ZIPAR.md §6: greedy decoding must not collapse); norms stay ones, the VQ and the
    vision encoder keep transformers' own init. Files: config.json, generation_config.json (guidance 5,
    temperature 1, pad and `generation_kwargs.boi_token_id` as the converted repositories have them),
    model.safetensors (save_pretrained's keys), the tokenizer, the processor with its chat template.
    """
    import torch
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusImageProcessor,
        JanusProcessor,
    )

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_janus_tokenizer()
    vocab = tokenizer.get_vocab()
    patch = 2 ** (len(vq_channel_multiplier) - 1)
    pixels = grid * patch
    config = JanusConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": len(vocab),
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads,
            "max_position_embeddings": max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
            "bos_token_id": vocab[BOS_TOKEN],
            "eos_token_id": vocab[EOS_TOKEN],
            "pad_token_id": vocab[PAD_TOKEN],
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "mlp_ratio": 2.0,
            "image_size": pixels,
            "patch_size": patch,
            "projection_dim": hidden_size,
            "num_image_tokens": grid * grid,
        },
        vq_config={
            "embed_dim": code_dim,
            "num_embeddings": codebook_size,
            "latent_channels": vq_base_channels,
            "base_channels": vq_base_channels,
            "channel_multiplier": list(vq_channel_multiplier),
            "num_res_blocks": vq_num_res_blocks,
            "projection_dim": hidden_size,
            "image_token_embed_dim": hidden_size,
        },
        image_token_id=vocab[IMAGE_TOKEN],
    )
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).float().eval()
    with torch.no_grad():  # normal weights on the text and generation matrices; norms and biases kept
        for name, param in model.named_parameters():
            text_or_generation = name.startswith(("model.language_model.", "model.generation_"))
            if text_or_generation and param.ndim == 2:
                param.normal_(0.0, std)
        # Code embeddings of unit scale, so image inputs weigh like text ones after the aligner; and
        # zero-mean head rows: GELU's outputs are mostly positive, so the code whose row sums highest
        # would otherwise win most cells.
        model.model.generation_embeddings.weight.normal_(0.0, 1.0)
        head = model.model.generation_head.vision_head.weight
        head -= head.mean(dim=1, keepdim=True)
    generation = model.generation_config
    generation._from_model_config = False
    generation.temperature = 1.0
    generation.guidance_scale = 5
    generation.bos_token_id = vocab[BOS_TOKEN]
    generation.eos_token_id = vocab[EOS_TOKEN]
    generation.pad_token_id = vocab[PAD_TOKEN]
    generation.generation_kwargs = {"boi_token_id": vocab[BOI_TOKEN]}
    model.save_pretrained(model_dir)
    image_processor = JanusImageProcessor(
        size={"height": pixels, "width": pixels}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    )
    processor = JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        use_default_system_prompt=True,
        num_image_tokens=grid * grid,
    )
    processor.save_pretrained(model_dir)
    return config
