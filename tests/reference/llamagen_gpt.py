"""Reference LlamaGen class-to-image GPT: pure PyTorch, float32, no KV cache, explicit attention mask.

Written from the published architecture of FoundationVision/LlamaGen, following
``autoregressive/models/gpt.py`` (``Transformer``, ``precompute_freqs_cis_2d``, ``apply_rotary_emb``) and
``autoregressive/models/generate.py`` (class conditioning, null class for CFG). The code here is our own; the
parameter names are the authors' so that their ``.pt`` state dicts load with ``strict=True``.

The oracle recomputes the whole sequence on every call and takes an explicit boolean ``attend`` matrix, so a
decoder can express any ZipAR mask (raster position, feed time, proxies) without a cache. It deliberately
imports nothing from ``vllm`` or ``vllm_zipar``: it is the independent side of the comparison.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Heads per width of the authors' published configs (GPT_B .. GPT_7B in gpt.py); used only when a checkpoint
# is loaded without a config, because the fused wqkv shape does not reveal the head count.
_AUTHORS_HEADS_BY_DIM = {768: 12, 1024: 16, 1280: 20, 1536: 24, 2048: 32, 2560: 40, 3200: 32, 4096: 32}


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of ``k`` that is ``>= n`` (the authors' SwiGLU width rounding)."""
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class ReferenceLlamaGenConfig:
    """Architecture of a LlamaGen c2i GPT (the fields of the authors' ``ModelArgs`` that shape weights)."""

    dim: int
    n_layer: int
    n_head: int
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    num_classes: int = 1000
    # Only sizes the label table: num_classes + 1 rows (the last is the CFG null class) when > 0.
    class_dropout_prob: float = 0.1
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256  # grid_size ** 2; the authors' 2D RoPE assumes a square grid

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.n_layer <= 0 or self.n_head <= 0:
            raise ValueError(
                f"dim, n_layer, n_head must be positive, got {self.dim}, {self.n_layer}, {self.n_head}"
            )
        if self.dim % self.n_head:
            raise ValueError(f"dim={self.dim} must be divisible by n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.kv_heads}")
        if self.head_dim % 4:
            # precompute_freqs_cis_2d splits head_dim/2 rotation pairs into a row half and a column half.
            raise ValueError(f"head_dim={self.head_dim} must be divisible by 4 for the 2D RoPE")
        grid = math.isqrt(self.block_size)
        if self.block_size <= 0 or grid * grid != self.block_size:
            raise ValueError(f"block_size={self.block_size} must be a positive perfect square")
        if self.cls_token_num != 1:
            # The authors' c2i embedder yields exactly one class token; longer prefixes are t2i only.
            raise ValueError(f"cls_token_num={self.cls_token_num}: the c2i reference supports only 1")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @classmethod
    def matching(cls, config) -> ReferenceLlamaGenConfig:
        """The oracle config of a model directory's config (any object with the project's
        `LlamaGenConfig` attribute names; read by name so the oracle imports nothing from the package)."""
        return cls(
            dim=config.dim,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_kv_head=config.n_kv_head,
            multiple_of=config.multiple_of,
            num_classes=config.num_classes,
            vocab_size=config.codebook_size,
            block_size=config.grid_size**2,
        )

    @property
    def label_rows(self) -> int:
        return self.num_classes + (1 if self.class_dropout_prob > 0 else 0)

    @property
    def null_class(self) -> int:
        """Class id of the unconditional (CFG) sequence; only exists when class_dropout_prob > 0."""
        return self.num_classes


def precompute_rope_2d(grid_size: int, head_dim: int, base: float, cls_token_num: int) -> torch.Tensor:
    """The authors' 2D rotary table, shape ``[cls_token_num + grid_size**2, head_dim // 2, 2]`` (cos, sin).

    Row ``cls_token_num + r * grid_size + c`` holds grid cell (r, c): the first half of the rotation pairs use
    angle ``r * freq``, the second half ``c * freq``. The ``cls_token_num`` prefix rows are all zeros (not the
    identity rotation), so rotated class-token queries and keys are exactly zero.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles = torch.outer(torch.arange(grid_size, dtype=torch.float32), freqs)  # [grid, head_dim // 4]
    rows = angles[:, None, :].expand(grid_size, grid_size, -1)
    cols = angles[None, :, :].expand(grid_size, grid_size, -1)
    grid_angles = torch.cat([rows, cols], dim=-1)  # [grid, grid, head_dim // 2]
    table = torch.stack([torch.cos(grid_angles), torch.sin(grid_angles)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, head_dim // 2, 2), table])


def rotate_pairs(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs ``(x[2i], x[2i+1])`` of ``x [seq, heads, head_dim]``.

    ``rope [seq, head_dim/2, 2]`` holds (cos, sin) per pair, used as given: a zero row maps the vector to
    zero, as in the authors' code.
    """
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos = rope[:, None, :, 0]
    sin = rope[:, None, :, 1]
    real = pairs[..., 0] * cos - pairs[..., 1] * sin
    imag = pairs[..., 1] * cos + pairs[..., 0] * sin
    return torch.stack([real, imag], dim=-1).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class LabelEmbedder(nn.Module):
    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(rows, dim)


class Attention(nn.Module):
    def __init__(self, cfg: ReferenceLlamaGenConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.dim = cfg.dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def project_qkv(self, x: torch.Tensor, rope: torch.Tensor):
        """``x [seq, dim]`` -> rotated q ``[seq, n_head, hd]``, rotated k and v ``[seq, n_kv_head, hd]``."""
        kv_size = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv_size, kv_size], dim=-1)
        q = rotate_pairs(q.view(-1, self.n_head, self.head_dim), rope)
        k = rotate_pairs(k.view(-1, self.n_kv_head, self.head_dim), rope)
        return q, k, v.view(-1, self.n_kv_head, self.head_dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project_qkv(x, rope)
        group = self.n_head // self.n_kv_head
        # Query head h reads kv head h // group, as repeat_interleave does in the authors' code.
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [heads, seq, hd]
        scores = (q @ k.transpose(1, 2)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~attend, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v  # [heads, seq, hd]
        return self.wo(out.transpose(0, 1).reshape(-1, self.dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: ReferenceLlamaGenConfig) -> None:
        super().__init__()
        hidden = cfg.ffn_hidden_dim
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ReferenceLlamaGenConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, attend)
        return h + self.feed_forward(self.ffn_norm(h))


class ReferenceLlamaGen(nn.Module):
    """LlamaGen c2i GPT with the authors' parameter names; inference only, one sequence per call."""

    def __init__(self, cfg: ReferenceLlamaGenConfig) -> None:
        super().__init__()
        self.config = cfg
        self.cls_embedding = LabelEmbedder(cfg.label_rows, cfg.dim)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Not persistent: the authors keep freqs_cis as a plain attribute, so their state dicts lack it.
        self.register_buffer(
            "rope_table",
            precompute_rope_2d(cfg.grid_size, cfg.head_dim, cfg.rope_base, cfg.cls_token_num),
            persistent=False,
        )

    @torch.no_grad()
    def forward_tokens(
        self,
        cond_class: int,
        image_token_ids: torch.Tensor,
        raster_positions: torch.Tensor,
        attend: torch.Tensor,
    ) -> torch.Tensor:
        """Logits ``float32 [n_total, vocab]`` for the class token followed by ``n`` image-token inputs.

        ``n_total = cls_token_num + n``. The class token sits at raster positions ``0 .. cls_token_num-1``;
        input ``i`` sits at ``raster_positions[i]`` (>= cls_token_num), which indexes the authors' rotary
        table directly (grid cell ``p - cls_token_num``). ``attend[i, j]`` says query ``i`` may attend key
        ``j``; every row must allow at least one key. Nothing is cached between calls.
        """
        cfg = self.config
        ids = torch.as_tensor(image_token_ids, dtype=torch.long).reshape(-1)
        pos = torch.as_tensor(raster_positions, dtype=torch.long).reshape(-1)
        n_total = cfg.cls_token_num + ids.numel()
        if pos.numel() != ids.numel():
            raise ValueError(f"{ids.numel()} image tokens but {pos.numel()} raster positions")
        if not 0 <= cond_class < cfg.label_rows:
            raise ValueError(f"cond_class={cond_class} outside [0, {cfg.label_rows})")
        if ids.numel() and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"image token ids must lie in [0, {cfg.vocab_size})")
        last = cfg.cls_token_num + cfg.block_size
        if pos.numel() and (pos.min() < cfg.cls_token_num or pos.max() >= last):
            raise ValueError(f"raster positions must lie in [{cfg.cls_token_num}, {last})")
        attend = torch.as_tensor(attend, dtype=torch.bool)
        if attend.shape != (n_total, n_total):
            raise ValueError(f"attend has shape {tuple(attend.shape)}, expected {(n_total, n_total)}")
        if not bool(attend.any(dim=1).all()):
            raise ValueError("every query must attend at least one key")

        cls = self.cls_embedding.embedding_table.weight[cond_class].float()
        h = torch.cat([cls.expand(cfg.cls_token_num, -1), self.tok_embeddings.weight[ids].float()])
        all_pos = torch.cat([torch.arange(cfg.cls_token_num), pos])
        rope = self.rope_table[all_pos]
        for layer in self.layers:
            h = layer(h, rope, attend)
        return self.output(self.norm(h)).float()


def _config_from_state_dict(
    sd: dict, args, n_head: int | None, block_size: int | None, cls_token_num: int, **ffn
) -> ReferenceLlamaGenConfig:
    vocab, dim = sd["tok_embeddings.weight"].shape
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    if n_head is None:
        n_head = _AUTHORS_HEADS_BY_DIM.get(dim)
        if n_head is None:
            raise ValueError(f"cannot infer n_head for dim={dim}; pass n_head= or config=")
    head_dim = dim // n_head
    qkv_rows = sd["layers.0.attention.wqkv.weight"].shape[0]
    n_kv_head = (qkv_rows // head_dim - n_head) // 2
    if block_size is None:
        if args is not None and hasattr(args, "image_size") and hasattr(args, "downsample_size"):
            block_size = (args.image_size // args.downsample_size) ** 2
        else:
            raise ValueError("checkpoint carries no args.image_size/downsample_size; pass block_size=")
    # The authors' c2i checkpoints are trained with class dropout, so the label table has a null row.
    cfg = ReferenceLlamaGenConfig(
        dim=dim,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=None if n_kv_head == n_head else n_kv_head,
        num_classes=sd["cls_embedding.embedding_table.weight"].shape[0] - 1,
        vocab_size=vocab,
        cls_token_num=cls_token_num,
        block_size=block_size,
        **ffn,
    )
    hidden = sd["layers.0.feed_forward.w1.weight"].shape[0]
    if hidden != cfg.ffn_hidden_dim:
        raise ValueError(
            f"FFN width {hidden} does not match multiple_of={cfg.multiple_of}, "
            f"ffn_dim_multiplier={cfg.ffn_dim_multiplier} ({cfg.ffn_hidden_dim}); "
            "pass those or config="
        )
    return cfg


def load_authors_checkpoint(
    path: str | Path,
    config: ReferenceLlamaGenConfig | None = None,
    *,
    n_head: int | None = None,
    block_size: int | None = None,
    cls_token_num: int = 1,
    multiple_of: int = 256,
    ffn_dim_multiplier: float | None = None,
) -> ReferenceLlamaGen:
    """Load one of the authors' c2i GPT ``.pt`` checkpoints strictly, in float32.

    Weights are read from ``"model"``, ``"state_dict"`` or the raw dict; ``freqs_cis`` is dropped. Only
    ``argparse.Namespace`` (training checkpoints pickle their ``args``) is allowed past ``weights_only``.
    Without ``config`` the architecture is inferred from the tensor shapes, the head count from the authors'
    published sizes (or ``n_head``), the grid from ``args`` (or ``block_size``); the FFN rounding
    (``multiple_of``, ``ffn_dim_multiplier``; the authors' defaults) is checked against the w1 shape.
    """
    torch.serialization.add_safe_globals([argparse.Namespace])
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "model" in ckpt:
        sd = ckpt["model"]
    elif "state_dict" in ckpt:
        sd = ckpt["state_dict"]
    else:
        sd = ckpt
    sd = {k: v for k, v in sd.items() if k != "freqs_cis"}
    if config is None:
        config = _config_from_state_dict(
            sd,
            ckpt.get("args"),
            n_head,
            block_size,
            cls_token_num,
            multiple_of=multiple_of,
            ffn_dim_multiplier=ffn_dim_multiplier,
        )
    model = ReferenceLlamaGen(config)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.eval()
