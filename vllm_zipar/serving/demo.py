"""The offline demo: one image per class through vLLM, written as a labelled grid PNG."""

from __future__ import annotations

import time
from pathlib import Path

from PIL import Image, ImageDraw


def labelled_grid(images: list[Image.Image], labels: list[str], columns: int = 8) -> Image.Image:
    """Tile images left to right, each with its label in a strip underneath (small images enlarged)."""
    scale = max(1, 128 // images[0].size[0])
    if scale > 1:
        size = (images[0].size[0] * scale, images[0].size[1] * scale)
        images = [image.resize(size, Image.NEAREST) for image in images]
    width, height = images[0].size
    strip = 14
    rows = (len(images) + columns - 1) // columns
    cols = min(columns, len(images))
    canvas = Image.new("RGB", (cols * width, rows * (height + strip)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        x, y = (i % columns) * width, (i // columns) * (height + strip)
        canvas.paste(image, (x, y))
        draw.text((x + 2, y + height + 1), label, fill="black")
    return canvas


def run_demo(model_dir: Path, out: Path, *, num_classes: int, seed: int, window: int = 4) -> None:
    """One image per class with NTP and with ZipAR-`window`, same seeds, side by side in a labelled grid."""
    import torch

    from vllm_zipar.serving.offline import ImageGenerator

    start = time.perf_counter()
    with ImageGenerator(model_dir) as generator:
        started = time.perf_counter()
        count = min(num_classes, generator.config.num_classes)
        labels = list(range(count))
        seeds = [seed + c for c in labels]
        ntp = generator.generate(labels, seeds=seeds, decoding="ntp")
        generated = time.perf_counter()
        zipar = generator.generate(labels, seeds=seeds, zipar_window=window)
        finished = time.perf_counter()
        pairs = [image for pair in zip(ntp, zipar, strict=True) for image in pair]
        images = generator.decode(torch.stack([r.tokens for r in pairs]))
    names = [
        f"{r.class_label}: {'NTP' if i % 2 == 0 else f'ZipAR-{window}'}, {r.passes} passes"
        for i, r in enumerate(pairs)
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    # `out` is one image at the model's resolution (grid x downsample pixels); the labelled grid of every
    # class drawn, NTP beside ZipAR, goes beside it.
    images[0].save(out)
    grid_path = out.with_name(f"{out.stem}_grid.png")
    labelled_grid(images, names, columns=2 * min(count, 4)).save(grid_path)
    print(
        f"engine start {started - start:.1f} s; NTP {(generated - started) / count:.3f} s/image, "
        f"ZipAR-{window} {(finished - generated) / count:.3f} s/image ({count} images each); "
        f"wrote {out} ({images[0].size[0]}x{images[0].size[1]} px, class 0, NTP) and {grid_path}"
    )
