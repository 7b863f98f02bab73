"""The `config.json` of a LlamaGen model directory, as a transformers config vLLM can read.

A model directory holds the authors' files unchanged (GPT `.pt`, VQ `.pt`) plus this small config. It names
the architecture, the size (one of the authors' GPT presets or explicit dimensions), the token grid and the
two checkpoint files. vLLM reads the standard attribute names (`hidden_size`, `num_attention_heads`, ...),
so the class maps the authors' names onto them. It imports transformers only: no vLLM, so the oracle side and
the command line can use it too.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# The authors' GPT presets (autoregressive/models/gpt.py in FoundationVision/LlamaGen): layers, heads, dim.
GPT_PRESETS: dict[str, dict[str, int]] = {
    "GPT-B": {"n_layer": 12, "n_head": 12, "dim": 768},
    "GPT-L": {"n_layer": 24, "n_head": 16, "dim": 1024},
    "GPT-XL": {"n_layer": 36, "n_head": 20, "dim": 1280},
    "GPT-XXL": {"n_layer": 48, "n_head": 24, "dim": 1536},
    "GPT-XXXL": {"n_layer": 48, "n_head": 40, "dim": 2560},
    "GPT-1B": {"n_layer": 22, "n_head": 32, "dim": 2048},
    "GPT-3B": {"n_layer": 24, "n_head": 32, "dim": 3200},
    "GPT-7B": {"n_layer": 32, "n_head": 32, "dim": 4096},
}

# Head sizes vLLM's CPU attention kernel accepts (vLLM 0.32). Every entry is a multiple of 16, so the same
# padding also suits the GPU kernels. GPT-3B's head dim is 100: it is padded to 112 with zero channels,
# which leaves q·k and the attention output unchanged (see LlamaGenAttention).
KERNEL_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def find_multiple(n: int, k: int) -> int:
    """The authors' rounding of the SwiGLU hidden size up to a multiple of `k`."""
    return n if n % k == 0 else n + k - (n % k)


def kernel_head_size(head_dim: int) -> int:
    """The smallest head size the attention kernel takes that holds `head_dim` channels."""
    for size in KERNEL_HEAD_SIZES:
        if size >= head_dim:
            return size
    raise ValueError(f"head dim {head_dim} exceeds the largest supported head size {KERNEL_HEAD_SIZES[-1]}")


# The authors' class-to-image sampling defaults (ZIPAR.md §5): ZipAR's LlamaGen scripts guide with scale 2.0;
# LlamaGen's sample_c2i.py keeps the top 2000 codes at temperature 1. A model directory may override them
# (config.json "sampling_defaults"), as the shipped digits model does.
C2I_SAMPLING_DEFAULTS: dict[str, Any] = {
    "cfg_scale": 2.0,
    "cfg_interval": -1,
    "temperature": 1.0,
    "top_k": 2000,
    "top_p": 1.0,
}


class LlamaGenConfig(PretrainedConfig):
    """Config of a LlamaGen class-to-image model directory (`model_type: "llamagen"`)."""

    model_type = "llamagen"

    def __init__(
        self,
        gpt_model: str | None = None,
        dim: int | None = None,
        n_layer: int | None = None,
        n_head: int | None = None,
        n_kv_head: int | None = None,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        rope_base: float = 10000.0,
        norm_eps: float = 1e-5,
        task: str = "c2i",
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        cls_token_num: int = 1,
        codebook_size: int = 16384,
        grid_size: int = 16,
        image_size: int | None = None,
        downsample: int = 16,
        gpt_checkpoint: str = "gpt.pt",
        vq_checkpoint: str = "vq.pt",
        vq_config: dict[str, Any] | None = None,
        sampling_defaults: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        preset = GPT_PRESETS.get(gpt_model or "", {})
        if gpt_model is not None and not preset:
            raise ValueError(f"unknown gpt_model {gpt_model!r}; known presets: {sorted(GPT_PRESETS)}")
        self.gpt_model = gpt_model
        self.dim = int(dim if dim is not None else preset.get("dim", 768))
        self.n_layer = int(n_layer if n_layer is not None else preset.get("n_layer", 12))
        self.n_head = int(n_head if n_head is not None else preset.get("n_head", 12))
        self.n_kv_head = int(n_kv_head) if n_kv_head is not None else self.n_head
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        self.multiple_of = int(multiple_of)
        self.ffn_dim_multiplier = ffn_dim_multiplier
        self.rope_base = float(rope_base)
        self.norm_eps = float(norm_eps)
        if task != "c2i":
            raise ValueError(f"task {task!r} is not supported yet; only 'c2i' (class-to-image)")
        self.task = task
        self.num_classes = int(num_classes)
        self.class_dropout_prob = float(class_dropout_prob)
        if cls_token_num != 1:
            raise ValueError(
                f"c2i models have cls_token_num 1 (the authors' LabelEmbedder), got {cls_token_num}"
            )
        self.cls_token_num = int(cls_token_num)
        self.codebook_size = int(codebook_size)
        self.grid_size = int(grid_size)
        self.downsample = int(downsample)
        self.image_size = int(image_size) if image_size is not None else self.grid_size * self.downsample
        if self.image_size != self.grid_size * self.downsample:
            raise ValueError(
                f"image_size {self.image_size} != grid_size {self.grid_size} x downsample {self.downsample}"
            )
        self.gpt_checkpoint = gpt_checkpoint
        self.vq_checkpoint = vq_checkpoint
        self.vq_config = dict(vq_config or {})
        unknown = set(sampling_defaults or {}) - set(C2I_SAMPLING_DEFAULTS)
        if unknown:
            raise ValueError(
                f"unknown sampling_defaults {sorted(unknown)}; known: {sorted(C2I_SAMPLING_DEFAULTS)}"
            )
        # What a request that names no sampling parameter gets (front-ends apply them; the engine never does).
        self.sampling_defaults = {**C2I_SAMPLING_DEFAULTS, **(sampling_defaults or {})}

        # The names vLLM reads. Prompt ids [vocab, vocab + num_classes] are class tokens (the last one is the
        # null class used by classifier-free guidance); the model only ever predicts image tokens.
        kwargs.setdefault("architectures", ["LlamaGenForImageGeneration"])
        kwargs.setdefault("torch_dtype", "float32")
        super().__init__(**kwargs)
        self.hidden_size = self.dim
        self.num_hidden_layers = self.n_layer
        self.num_attention_heads = self.n_head
        self.num_key_value_heads = self.n_kv_head
        self.rope_head_dim = self.dim // self.n_head
        self.head_dim = kernel_head_size(self.rope_head_dim)
        self.vocab_size = self.codebook_size
        # vLLM reads this as the longest KV sequence. A ZipAR request feeds every cell once plus, per row, at
        # most one proxy and one completion feed, so its sequence can exceed prompt + H·W by 2·H; with
        # classifier-free guidance one request holds both sequences (see zipar/guidance.py).
        self.max_position_embeddings = 2 * (self.cls_token_num + self.grid_size**2 + 2 * self.grid_size)
        self.intermediate_size = self.ffn_hidden_dim
        self.tie_word_embeddings = False

    # `head_dim` etc. are derived; keep them out of the saved config so a directory stays hand-editable.
    _derived = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rope_head_dim",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "intermediate_size",
        "tie_word_embeddings",
    )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in self._derived:
            out.pop(key, None)
        return out

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def num_class_embeddings(self) -> int:
        """Rows of the authors' label table: one more than the classes when trained with label dropout."""
        return self.num_classes + (1 if self.class_dropout_prob > 0 else 0)

    def class_token_id(self, class_label: int) -> int:
        """The prompt token id of `class_label`, refusing labels outside `[0, num_classes)`."""
        if isinstance(class_label, bool) or not isinstance(class_label, int):
            raise TypeError(f"class label must be an int, got {type(class_label).__name__}")
        if not 0 <= class_label < self.num_classes:
            raise ValueError(f"class label {class_label} is outside [0, {self.num_classes})")
        return self.codebook_size + class_label

    @property
    def null_class_token_id(self) -> int:
        """The prompt token id of the unconditional (null) class that guidance runs against."""
        if self.num_class_embeddings <= self.num_classes:
            raise ValueError("this model was trained without label dropout: it has no null class")
        return self.codebook_size + self.num_classes
