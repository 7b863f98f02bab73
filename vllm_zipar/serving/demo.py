"""The demo: one image per class, NTP beside ZipAR, written as a labelled grid PNG.

`run_served_demo` starts `vllm serve MODEL --decoding zipar` and asks its `POST /v1/images/generations` with
the official `openai` client, as a user would; `run_demo` does the same offline through `vllm.LLM`.
"""

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


def write_demo_images(images: list[Image.Image], names: list[str], out: Path, count: int) -> Path:
    """`out`: the first image at the model's resolution; beside it `<out>_grid.png`, the labelled grid of
    every class drawn, NTP beside ZipAR. Returns the grid's path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(out)
    grid_path = out.with_name(f"{out.stem}_grid.png")
    labelled_grid(images, names, columns=2 * min(count, 5)).save(grid_path)
    return grid_path


def run_demo(model_dir: Path, out: Path, *, num_classes: int, seed: int, window: int = 4) -> None:
    """One image per class with NTP and with ZipAR-`window`, same seeds, side by side in a labelled grid."""
    import torch

    from vllm_zipar.serving.offline import ImageGenerator

    start = time.perf_counter()
    with ImageGenerator(model_dir) as generator:
        started = time.perf_counter()
        count = min(num_classes, generator.model.num_classes or num_classes)
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
    grid_path = write_demo_images(images, names, out, count)
    print(
        f"engine start {started - start:.1f} s; NTP {(generated - started) / count:.3f} s/image, "
        f"ZipAR-{window} {(finished - generated) / count:.3f} s/image ({count} images each); "
        f"wrote {out} ({images[0].size[0]}x{images[0].size[1]} px, class 0, NTP) and {grid_path}"
    )


def run_served_demo(model_dir: Path, out: Path, *, num_classes: int, seed: int, window: int = 4) -> None:
    """`run_demo` through the HTTP server: every image is one `client.images.generate` call."""
    import base64
    import io

    from openai import OpenAI

    from vllm_zipar.models.registry import load_image_model
    from vllm_zipar.serving.served_model import ServedModel
    from vllm_zipar.zipar.plan import zipar_steps

    image_model = load_image_model(model_dir)
    count = min(num_classes, image_model.num_classes or num_classes)
    size = image_model.native_size
    rows, cols = size.grid
    log_path = out.with_name("demo_server.log")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ServedModel(model_dir, decoding="zipar", zipar_window=window, log_path=log_path) as server:
        started = time.perf_counter()
        client = OpenAI(base_url=f"{server.url}/v1", api_key="demo")
        model = client.models.list().data[0].id
        images, names = [], []
        for label in range(count):
            eol = image_model.eol_token is not None
            for decoding, passes in [("ntp", rows * cols), ("zipar", zipar_steps(rows, cols, window, eol))]:
                response = client.images.generate(
                    model=model,
                    prompt=str(label),
                    size=size.name,
                    response_format="b64_json",
                    extra_body={"seed": seed + label, "decoding": decoding}
                    | ({"zipar_window": window} if decoding == "zipar" else {}),
                )
                images.append(Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))))
                mode = "NTP" if decoding == "ntp" else f"ZipAR-{window}"
                names.append(f"{label}: {mode}, {passes} passes")
        finished = time.perf_counter()
    grid_path = write_demo_images(images, names, out, count)
    print(
        f"served by `vllm serve {model_dir} --decoding zipar --zipar-window {window}` (log: {log_path}); "
        f"start {started - start:.1f} s, {(finished - started) / (2 * count):.3f} s per image request; "
        f"wrote {out} ({images[0].size[0]}x{images[0].size[1]} px) and {grid_path}"
    )
