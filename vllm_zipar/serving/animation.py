"""`vllm-zipar animate`: an animated WebP/GIF of NTP beside ZipAR decoding the same image, one frame per pass.

Both images come from vLLM's engine (`ImageGenerator`, same class and seed); frame `p` shows the cells that
passes `0..p` sampled (the plan's order, `zipar.shape.PlanShape.sampled_at`, checked against the engine's
pass count) VQ-decoded, the rest grey, as the server's partial images are. ZipAR finishes first and holds
its image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from vllm_zipar.zipar.shape import plan_shape

GREY = 128  # as images_route.PARTIAL_FILL
LABEL_STRIP = 16


def pass_frames(
    decode: Callable[[torch.Tensor], list[Image.Image]], grid: torch.Tensor, order: Sequence[int]
) -> list[Image.Image]:
    """One image per pass of a finished token grid [H, W]: cells sampled by later passes grey."""
    height, width = grid.shape
    passes = max(order) + 1
    later = torch.tensor(order).view(1, height, width) > torch.arange(passes).view(-1, 1, 1)
    grids = grid.expand(passes, height, width).clone()
    grids[later] = 0
    images = decode(grids)
    scale = images[0].size[0] // width
    frames = []
    for image, mask in zip(images, later.numpy(), strict=True):
        pixels = np.array(image)
        pixels[np.kron(mask, np.ones((scale, scale), dtype=bool))] = GREY
        frames.append(Image.fromarray(pixels))
    return frames


def side_by_side(panels: Sequence[tuple[str, list[Image.Image]]], zoom: int) -> list[Image.Image]:
    """Frames of several labelled panels; a panel that ran out of passes holds its last image."""
    count = max(len(frames) for _, frames in panels)
    width, height = panels[0][1][0].size
    width, height = width * zoom, height * zoom
    out = []
    for p in range(count):
        size = (len(panels) * width + (len(panels) - 1) * 4, height + LABEL_STRIP)
        canvas = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(canvas)
        for i, (name, frames) in enumerate(panels):
            shown = min(p, len(frames) - 1)
            x = i * (width + 4)
            canvas.paste(frames[shown].resize((width, height), Image.NEAREST), (x, 0))
            done = " done" if p >= len(frames) - 1 else ""
            draw.text((x + 2, height + 2), f"{name}: pass {shown + 1}/{len(frames)}{done}", fill="black")
        out.append(canvas)
    return out


def save_animation(frames: list[Image.Image], out: Path, frame_ms: int, hold_ms: int) -> None:
    """Animated WebP or GIF (by `out`'s suffix); the last frame is held `hold_ms`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    durations = [frame_ms] * (len(frames) - 1) + [hold_ms]
    kwargs = {"lossless": True, "method": 6} if out.suffix.lower() == ".webp" else {"optimize": True}
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=durations, loop=0, **kwargs)


def animate(
    model_dir: Path,
    out: Path,
    *,
    prompt: str,
    window: int,
    seed: int,
    zoom: int = 4,
    frame_ms: int = 40,
    hold_ms: int = 2000,
) -> dict[str, int]:
    """Decode `prompt` with NTP and ZipAR-`window` (same seed) and write the animation; returns the passes."""
    from vllm_zipar.serving.offline import ImageGenerator

    with ImageGenerator(model_dir, decoding="zipar", zipar_window=window) as generator:
        panels, passes = [], {}
        for name, decoding, win in (("NTP", "ntp", None), (f"ZipAR-{window}", "zipar", window)):
            (image,) = generator.generate([prompt], seeds=[seed], decoding=decoding, zipar_window=win)
            chosen, layout = generator.requests.decoding_of(image.stats)
            order = plan_shape(layout, chosen.window, chosen.uncond_prompt_len).sampled_at
            if max(order) + 1 != image.passes:  # the plan's order must be the engine's
                raise RuntimeError(f"{name}: the plan has {max(order) + 1} passes, the engine {image.passes}")
            panels.append((name, pass_frames(generator.decode, image.tokens, order)))
            passes[name] = image.passes
    save_animation(side_by_side(panels, zoom), out, frame_ms, hold_ms)
    return passes
