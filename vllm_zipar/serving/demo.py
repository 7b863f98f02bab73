"""The offline demo: one image per class through vLLM, written as a labelled grid PNG."""

from __future__ import annotations

import time
from pathlib import Path

from PIL import Image, ImageDraw


def labelled_grid(images: list[Image.Image], labels: list[str], columns: int = 8) -> Image.Image:
    """Tile images left to right, each with its label in a strip underneath."""
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


def run_demo(model_dir: Path, out: Path, *, num_classes: int, seed: int) -> None:
    import torch

    from vllm_zipar.serving.offline import ImageGenerator

    start = time.perf_counter()
    generator = ImageGenerator(model_dir)
    started = time.perf_counter()
    count = min(num_classes, generator.config.num_classes)
    results = generator.generate(list(range(count)), seeds=[seed + c for c in range(count)])
    generated = time.perf_counter()
    images = generator.decode(torch.stack([r.tokens for r in results]))
    labels = [f"class {r.class_label} (NTP)" for r in results]
    out.parent.mkdir(parents=True, exist_ok=True)
    # `out` is one image at the model's resolution (grid × downsample pixels); the labelled grid of every
    # class drawn goes beside it.
    images[0].save(out)
    grid_path = out.with_name(f"{out.stem}_grid.png")
    labelled_grid(images, labels).save(grid_path)
    print(
        f"engine start {started - start:.1f} s; {count} images in {generated - started:.2f} s "
        f"({(generated - started) / count:.3f} s/image); "
        f"wrote {out} ({images[0].size[0]}x{images[0].size[1]} px, "
        f"class {results[0].class_label}) and {grid_path}"
    )
