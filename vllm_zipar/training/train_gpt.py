"""Training the demo model's generator: a small LlamaGen c2i GPT on the VQ codes of the training digits.

The recipe is the authors' ``autoregressive/train/train_c2i.py`` scaled down: codes are precomputed once (they
train on pre-extracted codes too, with flip/crop variants; here digits must not be flipped, so the variants
are token-aligned shifts of the page, re-encoded by the VQ), teacher-forced cross-entropy over all grid
tokens, label dropout 0.1 (null class for CFG), token/residual/FFN dropout 0.1, AdamW with betas (0.9, 0.95),
weight decay 0.05 on matrices and embeddings, gradient clipping at 1.0. Differences, for a CPU budget of
minutes: a higher peak learning rate with warm-up and cosine decay, and bf16 autocast (float32 master weights)
where the CPU has bf16 matrix units. Saved with ``save_gpt_checkpoint`` in their ``{"model", "steps",
"args"}`` layout.

A model this small, trained this briefly, barely uses its class token (its samples are digits, but mostly
not the asked-for one; CFG alone does not fix that at this size), so ``align_cca`` then
fine-tunes it with Condition Contrastive Alignment, which makes plain sampling follow the class.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vllm_zipar.models.llamagen_checkpoint import check_gpt_state_dict, save_gpt_checkpoint
from vllm_zipar.models.llamagen_config import LlamaGenConfig
from vllm_zipar.models.vq.llamagen_vq import LlamaGenVQModel
from vllm_zipar.training.data import DigitSplit, shift_images
from vllm_zipar.training.gpt import LlamaGenC2I
from vllm_zipar.training.train_vq import cosine_lr, encode_split

# Page shifts whose codes the GPT trains on: whole tokens (2 px at downsample 2) up to one token each way.
TOKEN_SHIFTS = (-1, 0, 1)


def demo_gpt_config(vq_config: dict, *, grid_size: int = 16, downsample: int = 2) -> LlamaGenConfig:
    """The demo generator: dim 128, 4 layers, 4 heads of 32 (the smallest head vLLM's CPU kernel takes)."""
    return LlamaGenConfig(
        dim=128,
        n_layer=4,
        n_head=4,
        multiple_of=64,  # SwiGLU width 384 (the authors' 256 would round it up to 512 at this width)
        num_classes=10,
        class_dropout_prob=0.1,
        codebook_size=int(vq_config["codebook_size"]),
        grid_size=grid_size,
        downsample=downsample,
        gpt_checkpoint="gpt.pt",
        vq_checkpoint="vq.pt",
        vq_config=vq_config,
    )


def shifted_codes(vq: LlamaGenVQModel, train: DigitSplit, token_shifts=TOKEN_SHIFTS) -> torch.Tensor:
    """Codes ``[V, N, h, w]`` of every training image under every (dy, dx) page shift in whole tokens."""
    ds = vq.config.downsample
    variants = []
    for dy in token_shifts:
        for dx in token_shifts:
            variants.append(encode_split(vq, shift_images(train.images, dy * ds, dx * ds)))
    return torch.stack(variants)


def bf16_available() -> bool:
    """Whether bf16 autocast is worth it here: a CPU with bf16 matrix instructions (AMX or AVX512-BF16)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def train_gpt(
    codes: torch.Tensor,
    labels: torch.Tensor,
    config: LlamaGenConfig,
    *,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    bf16: bool | None = None,
    log_every: int = 50,
    progress: bool = True,
) -> tuple[LlamaGenC2I, list[dict[str, float]]]:
    """Teacher-forced training on ``codes [V, N, h, w]`` (V augmentation variants of N images) with class
    ``labels [N]``; returns the model (eval mode) and the loss log."""
    if codes.dim() != 4 or codes.shape[1] != labels.shape[0]:
        raise ValueError(f"codes must be [V, N, h, w] with N = {labels.shape[0]}, got {tuple(codes.shape)}")
    torch.manual_seed(seed)
    data_gen = torch.Generator().manual_seed(seed)
    use_bf16 = bf16_available() if bf16 is None else bf16
    model = LlamaGenC2I(config)
    model.train()  # label dropout on: it is what makes the null class usable for CFG
    optimizer = torch.optim.AdamW(model.param_groups(weight_decay), lr=lr, betas=(0.9, 0.95))
    flat = codes.reshape(codes.shape[0], codes.shape[1], -1)
    history: list[dict[str, float]] = []
    running, count = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="GPT", disable=not progress, mininterval=5.0)
    for step in bar:
        image = torch.randint(0, flat.shape[1], (batch_size,), generator=data_gen)
        variant = torch.randint(0, flat.shape[0], (batch_size,), generator=data_gen)
        z = flat[variant, image]
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=min(100, steps // 10 + 1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            _, loss = model(z[:, :-1], labels[image], targets=z)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running += float(loss.detach())
        count += 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            entry = {
                "step": step + 1,
                "seconds": round(time.perf_counter() - start, 1),
                "loss": round(running / count, 5),
                "lr": round(optimizer.param_groups[0]["lr"], 7),
            }
            history.append(entry)
            running, count = 0.0, 0
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
    return model.eval(), history


@torch.inference_mode()
def evaluate_gpt(
    model: LlamaGenC2I, codes: torch.Tensor, labels: torch.Tensor, batch_size: int = 128
) -> float:
    """Mean teacher-forced cross-entropy (nats per token) of ``codes [N, h, w]`` in eval mode."""
    model.eval()
    flat = codes.reshape(codes.shape[0], -1)
    total = 0.0
    for begin in range(0, flat.shape[0], batch_size):
        z = flat[begin : begin + batch_size]
        _, loss = model(z[:, :-1], labels[begin : begin + batch_size], targets=z)
        total += float(loss) * z.shape[0]
    return total / flat.shape[0]


def save_gpt(model: LlamaGenC2I, path: str | Path, config: LlamaGenConfig) -> None:
    """The authors' checkpoint layout, checked against ``config`` before it is written."""
    state = model.authors_state_dict()
    check_gpt_state_dict(state, config, path)
    save_gpt_checkpoint(state, path, layout="model", config=config)


def sequence_logp(model: LlamaGenC2I, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p(tokens | label)`` per sequence ``[B]`` (sum over all grid tokens)."""
    logits, _ = model(tokens[:, :-1], labels)
    return torch.gather(logits.log_softmax(-1), 2, tokens.unsqueeze(2)).squeeze(2).sum(-1)


def align_cca(
    model: LlamaGenC2I,
    codes: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 2e-4,
    beta: float = 0.02,
    lam: float = 1.0,
    uncond_ratio: float = 0.1,
    seed: int = 0,
    bf16: bool | None = None,
    log_every: int = 50,
    progress: bool = True,
    reference: LlamaGenC2I | None = None,
    on_log=None,
) -> tuple[LlamaGenC2I, list[dict[str, float]]]:
    """Condition Contrastive Alignment (Chen et al. 2024, arXiv 2410.09347; the loss of their public
    ``LlamaGen_finetune.py``, written anew here): fine-tune so that samples follow their class without
    classifier-free guidance (or with a much milder one).

    Against a frozen copy of the pretrained model (the reference), raise ``log p(x | c) - log p_ref(x | c)``
    for each training image with its own class and lower it for the same image with another class (the
    batch's labels rolled by one): ``-logsigmoid(beta * gap_pos) - lam * logsigmoid(-beta * gap_neg)``,
    divided by ``lam``. A fraction ``uncond_ratio`` of rows uses the null class on both sides and counts as
    positive, so the unconditional model (needed for CFG) stays intact. Dropout off, as in their recipe.
    The result has the same architecture and checkpoint format; it approximates the CFG-guided distribution.

    ``reference`` (default: a frozen copy of ``model`` as passed) lets a run continue an earlier alignment
    against the original pretrained model; ``on_log(entry, model)`` is called at every log step.
    """
    import copy

    torch.manual_seed(seed)
    data_gen = torch.Generator().manual_seed(seed)
    use_bf16 = bf16_available() if bf16 is None else bf16
    reference = copy.deepcopy(model if reference is None else reference).eval()
    for param in reference.parameters():
        param.requires_grad_(False)
    # No dropout of any kind (label dropout included: the null class is chosen explicitly below).
    model.eval()
    optimizer = torch.optim.AdamW(model.param_groups(0.0), lr=lr, betas=(0.9, 0.95))
    flat = codes.reshape(codes.shape[0], codes.shape[1], -1)
    null = model.config.num_classes
    history: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    count = 0
    bar = tqdm(range(steps), desc="CCA", disable=not progress, mininterval=5.0)
    start = time.perf_counter()
    for step in bar:
        image = torch.randint(0, flat.shape[1], (batch_size,), generator=data_gen)
        variant = torch.randint(0, flat.shape[0], (batch_size,), generator=data_gen)
        z = flat[variant, image]
        positive = labels[image].clone()
        negative = torch.roll(positive, shifts=-1)
        uncond = torch.rand(batch_size, generator=data_gen) < uncond_ratio
        positive[uncond] = null
        negative[uncond] = null
        # Rows whose "negative" is the null class or the same class are positives (weight 1).
        as_positive = uncond | (negative == positive)
        both_z = torch.cat([z, z])
        both_labels = torch.cat([positive, negative])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            with torch.no_grad():
                ref_logp = sequence_logp(reference, both_z, both_labels)
            logp = sequence_logp(model, both_z, both_labels)
        gap = (logp - ref_logp).float()
        gap_pos, gap_neg = gap[:batch_size], gap[batch_size:]
        sign = torch.where(as_positive, 1.0, -1.0)
        weight = torch.where(as_positive, 1.0, lam)
        loss = -F.logsigmoid(beta * gap_pos).mean() - (weight * F.logsigmoid(sign * beta * gap_neg)).mean()
        loss = loss / max(lam, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        parts = {
            "loss": float(loss.detach()),
            "gap_pos": float(gap_pos.detach().mean()),
            "gap_neg": float(gap_neg.detach()[~as_positive].mean()) if bool((~as_positive).any()) else 0.0,
        }
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + value
        count += 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            entry = {"step": step + 1, "seconds": round(time.perf_counter() - start, 1)}
            entry.update({key: round(value / count, 5) for key, value in sums.items()})
            history.append(entry)
            sums, count = {}, 0
            bar.set_postfix(loss=f"{entry['loss']:.4f}", neg=f"{entry['gap_neg']:.1f}")
            if on_log is not None:
                on_log(entry, model)
    return model.eval(), history
