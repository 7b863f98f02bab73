"""A trainable LlamaGen class-to-image GPT whose state dict is the authors' checkpoint format.

Written for this project following FoundationVision/LlamaGen ``autoregressive/models/gpt.py`` (``Transformer``
with ``model_type='c2i'``, ``LabelEmbedder``, ``precompute_freqs_cis_2d``, ``apply_rotary_emb``) and the
teacher-forced objective of their ``autoregressive/train/train_c2i.py``: the input is the class token followed
by the first ``grid² - 1`` image tokens, and the logits at positions ``cls_token_num - 1`` .. end predict all
``grid²`` image tokens. Same parameter names and shapes (``cls_embedding.embedding_table``,
``tok_embeddings``, ``layers.i.attention.wqkv`` ...), same numerics (RMSNorm in float32, SwiGLU, 2D RoPE with
all-zero rows for the class token, causal SDPA), the same initialisation (normal 0.02, zero output layer) and
the same regularisers (label dropout to the null class for classifier-free guidance, token/residual/FFN
dropout). The rotary table is a non-persistent buffer, so ``state_dict()`` holds exactly the keys of their
checkpoints and loads into the serving model and the reference oracle unchanged. Sizes come from the
project's ``LlamaGenConfig`` (the model directory's config.json).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm_zipar.models.llamagen_config import LlamaGenConfig

INITIALIZER_RANGE = 0.02  # the authors' ModelArgs.initializer_range


def rope_table_2d(grid_size: int, head_dim: int, base: float, cls_token_num: int) -> torch.Tensor:
    """``[cls_token_num + grid², head_dim/2, 2]`` (cos, sin): rows turn the first half of each head's rotation
    pairs, columns the second half; class-token rows are zeros (their q and k vanish, as in the authors')."""
    if head_dim % 4:
        raise ValueError(f"head dim {head_dim} must be a multiple of 4 for the 2D rotary embedding")
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles = torch.outer(torch.arange(grid_size, dtype=torch.float32), freqs)
    grid_angles = torch.cat(
        [angles[:, None, :].expand(-1, grid_size, -1), angles[None, :, :].expand(grid_size, -1, -1)], dim=-1
    )
    table = torch.stack([torch.cos(grid_angles), torch.sin(grid_angles)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, half, 2), table])


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x [B, T, heads, head_dim]`` by ``table [T, head_dim/2, 2]``."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos = table[None, :, None, :, 0]
    sin = table[None, :, None, :, 1]
    rotated = torch.stack(
        [pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], dim=-1
    )
    return rotated.flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)).type_as(
            x
        ) * self.weight


class LabelEmbedder(nn.Module):
    """Class labels -> one embedding each; in training a random 10% become the null class (row
    ``num_classes``), which is what classifier-free guidance samples against."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (1 if dropout_prob > 0 else 0), dim)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, config: LlamaGenConfig, resid_dropout: float) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.dim // config.n_head
        self.dim = config.dim
        self.wqkv = nn.Linear(config.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        kv_size = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(batch, seq, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(k.view(batch, seq, self.n_kv_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(batch, seq, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            # Sampling: one new position per call after the prefill; it may see every cached key.
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        group = self.n_head // self.n_kv_head
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(batch, seq, self.dim)))


class FeedForward(nn.Module):
    def __init__(self, config: LlamaGenConfig, dropout: float) -> None:
        super().__init__()
        hidden = config.ffn_hidden_dim
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaGenConfig, resid_dropout: float, ffn_dropout: float) -> None:
        super().__init__()
        self.attention = Attention(config, resid_dropout)
        self.feed_forward = FeedForward(config, ffn_dropout)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class LlamaGenC2I(nn.Module):
    """The authors' c2i ``Transformer`` for training: ``forward(image_tokens, labels)`` returns the logits
    that predict every image token (teacher forcing) and, given targets, the mean cross-entropy."""

    def __init__(
        self,
        config: LlamaGenConfig,
        *,
        token_dropout: float = 0.1,
        resid_dropout: float = 0.1,
        ffn_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if config.cls_token_num != 1:
            raise ValueError(f"c2i models have cls_token_num 1, got {config.cls_token_num}")
        self.config = config
        self.cls_token_num = config.cls_token_num
        self.block_size = config.grid_size**2
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.codebook_size, config.dim)
        self.tok_dropout = nn.Dropout(token_dropout)
        self.layers = nn.ModuleList(
            TransformerBlock(config, resid_dropout, ffn_dropout) for _ in range(config.n_layer)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.codebook_size, bias=False)
        # Derived, like the authors' freqs_cis attribute: kept out of the state dict.
        self.register_buffer(
            "freqs_cis",
            rope_table_2d(
                config.grid_size, config.dim // config.n_head, config.rope_base, config.cls_token_num
            ),
            persistent=False,
        )
        self.apply(self._init_weights)
        nn.init.zeros_(self.output.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=INITIALIZER_RANGE)

    def forward(
        self, image_tokens: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``image_tokens [B, T]`` (T <= grid² - 1, the inputs after the class token), ``labels [B]``.

        Returns logits ``[B, T + 1, codebook_size]`` (position ``i`` predicts image token ``i``) and, when
        ``targets [B, T + 1]`` is given, the mean cross-entropy over all of them.
        """
        if image_tokens.dim() != 2 or image_tokens.shape[1] > self.block_size - 1:
            raise ValueError(
                f"image_tokens must be [B, T] with T <= {self.block_size - 1}, "
                f"got {tuple(image_tokens.shape)}"
            )
        if labels.shape != image_tokens.shape[:1]:
            raise ValueError(f"labels must be [B={image_tokens.shape[0]}], got {tuple(labels.shape)}")
        cond = self.cls_embedding(labels)[:, : self.cls_token_num]
        h = self.tok_dropout(torch.cat([cond, self.tok_embeddings(image_tokens)], dim=1))
        rope = self.freqs_cis[: h.shape[1]]
        for layer in self.layers:
            h = layer(h, rope)
        logits = self.output(self.norm(h)).float()[:, self.cls_token_num - 1 :]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        cfg_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Next-token prediction with a KV cache: token grids ``[B, grid, grid]``.

        For previews and checks during training; the shipped sampler is vLLM's engine.
        ``temperature == 0`` is greedy; ``top_k`` 0 keeps every token; ``top_p`` 1 keeps every token.
        ``cfg_scale != 1`` guides every token with the null class: ``u + s * (c - u)`` on the logits, then
        temperature, top-k and top-p, as the authors' ``sample_c2i.py`` does.
        """
        was_training = self.training
        self.eval()
        batch = labels.shape[0]
        guided = cfg_scale != 1.0
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.config.num_classes)])
        caches: list[list] = [[] for _ in self.layers]
        h = self.cls_embedding(labels)[:, : self.cls_token_num]
        tokens = []
        for position in range(self.block_size):
            rope = (
                self.freqs_cis[: self.cls_token_num]
                if position == 0
                else self.freqs_cis[self.cls_token_num + position - 1 : self.cls_token_num + position]
            )
            for layer, cache in zip(self.layers, caches, strict=True):
                h = layer(h, rope, cache)
            logits = self.output(self.norm(h[:, -1])).float()
            if guided:
                cond, uncond = logits[:batch], logits[batch:]
                logits = uncond + cfg_scale * (cond - uncond)
            if temperature == 0:
                token = logits.argmax(dim=-1)
            else:
                logits = logits / temperature
                if 0 < top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                if top_p < 1.0:
                    sorted_probs, order = probs.sort(dim=-1, descending=True)
                    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
                    beyond = sorted_probs.cumsum(-1) - sorted_probs > top_p
                    sorted_probs = sorted_probs.masked_fill(beyond, 0.0)
                    probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
                token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            tokens.append(token)
            h = self.tok_embeddings(torch.cat([token, token]) if guided else token)[:, None]
        self.train(was_training)
        grid = self.config.grid_size
        return torch.stack(tokens, dim=1).view(-1, grid, grid)

    def authors_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached, contiguous CPU copies of the weights under the authors' names (for saving)."""
        return {key: value.detach().cpu().clone().contiguous() for key, value in self.state_dict().items()}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """train_c2i.py's optimiser groups: weight decay on matrices and embeddings, none on norms."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
