"""Reference decode of Meta's Chameleon VQGAN: functional PyTorch over the checkpoint's state dict, float32.

Written from taming-transformers' ``VQModel.decode`` and ``Decoder`` as Lumina-mGPT ships them
(``lumina_mgpt/model/chameleon_vae_ori/vqgan.py``) and Lumina's ``ImageTokenizer.pil_from_img_toks`` /
``_pil_from_chw_tensor`` (``image_tokenizer.py``), independently of ``vllm_zipar.models.vq.chameleon_vqgan``:
it reads ``vqgan.yaml`` and ``vqgan.ckpt`` itself and addresses every weight by its taming key. Decode:
codebook rows for the codes, channels first; ``post_quant_conv``; ``decoder.conv_in``; mid (res, attention,
res); levels from the lowest resolution up, each ``num_res_blocks + 1`` res blocks (attention after each
where the level's nominal resolution is in ``attn_resolutions``) then nearest x2 + conv; GroupNorm, swish,
``conv_out``. Res block: GroupNorm(32, eps 1e-6), swish, 3x3 conv, twice, a 1x1 ``nin_shortcut`` on the
skip when the width changes. Attention: one head over all positions, scaled by channels^-1/2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

GROUPS = 32
EPS = 1e-6


def read_vqgan_files(
    config_path: str | Path, checkpoint_path: str | Path
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(``model.params`` of the yaml, the checkpoint's ``state_dict`` as float32)."""
    params = yaml.safe_load(Path(config_path).read_text())["model"]["params"]
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
    return params, {key: value.float() for key, value in state.items()}


def _conv(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    weight = sd[f"{name}.weight"]
    return F.conv2d(x, weight, sd[f"{name}.bias"], padding=weight.shape[-1] // 2)


def _norm_swish(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str, swish: bool = True) -> torch.Tensor:
    h = F.group_norm(x, GROUPS, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=EPS)
    return h * torch.sigmoid(h) if swish else h


def _resnet(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    h = _conv(_norm_swish(x, sd, f"{name}.norm1"), sd, f"{name}.conv1")
    h = _conv(_norm_swish(h, sd, f"{name}.norm2"), sd, f"{name}.conv2")
    skip = _conv(x, sd, f"{name}.nin_shortcut") if f"{name}.nin_shortcut.weight" in sd else x
    return skip + h


def _attention(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    b, c, height, width = x.shape
    h = _norm_swish(x, sd, f"{name}.norm", swish=False)
    q, k, v = (_conv(h, sd, f"{name}.{p}").flatten(2) for p in ("q", "k", "v"))  # [B, C, N]
    scores = torch.einsum("bci,bcj->bij", q, k) / np.sqrt(c)
    out = torch.einsum("bij,bcj->bci", scores.softmax(dim=-1), v).reshape(b, c, height, width)
    return x + _conv(out, sd, f"{name}.proj_out")


def _upsample_nearest_x2(x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def reference_decode(params: dict, sd: dict[str, torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
    """Codes [B, H, W] -> pixels [B, out_ch, 16H, 16W] (for five levels), as Lumina's decode computes them."""
    dd = params["ddconfig"]
    levels, blocks = len(dd["ch_mult"]), dd["num_res_blocks"]
    attn_at = set(dd["attn_resolutions"] or ())
    latent = sd["quantize.embedding.weight"][codes.long()]  # [B, H, W, embed_dim]
    h = _conv(latent.permute(0, 3, 1, 2), sd, "post_quant_conv")
    h = _conv(h, sd, "decoder.conv_in")
    h = _resnet(h, sd, "decoder.mid.block_1")
    h = _attention(h, sd, "decoder.mid.attn_1")
    h = _resnet(h, sd, "decoder.mid.block_2")
    nominal = dd["resolution"] // 2 ** (levels - 1)
    for level in range(levels - 1, -1, -1):
        for i in range(blocks + 1):
            h = _resnet(h, sd, f"decoder.up.{level}.block.{i}")
            if nominal in attn_at:
                h = _attention(h, sd, f"decoder.up.{level}.attn.{i}")
        if level > 0:
            h = _conv(_upsample_nearest_x2(h), sd, f"decoder.up.{level}.upsample.conv")
            nominal *= 2
    h = _conv(_norm_swish(h, sd, "decoder.norm_out"), sd, "decoder.conv_out")
    return torch.tanh(h) if dd.get("tanh_out", False) else h


def reference_pil_arrays(pixels: torch.Tensor) -> list[np.ndarray]:
    """Lumina's ``_pil_from_chw_tensor`` per image, up to the uint8 HWC array it hands to PIL."""
    arrays = []
    for chw in pixels:
        unit = (torch.clamp(chw.detach().cpu(), -1.0, 1.0) + 1.0) / 2.0
        arrays.append((unit.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    return arrays
