"""Shared set-up of the benchmarks: a LlamaGen-shaped random model in the authors' format, and plots."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

CACHE = Path(__file__).resolve().parent / ".cache"
# Tests point this elsewhere so smoke runs leave the committed results alone.
RESULTS = Path(os.environ.get("ZIPAR_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))

# LlamaGen-B (the authors' GPT-B: 12 layers, 12 heads, dim 768, codebook 16384) on a 24x24 grid (384 px).
LLAMAGEN_B_24 = dict(gpt_model="GPT-B", grid_size=24, num_classes=1000, codebook_size=16384)
# A small stand-in for --quick runs.
SMALL_16 = dict(
    dim=256, n_layer=4, n_head=4, grid_size=16, num_classes=10, codebook_size=1024, multiple_of=64
)


def random_model(name: str, shape: dict[str, Any]) -> Path:
    """A model directory of random weights in the authors' `.pt` layout, written once and cached."""
    from vllm_zipar.testing.llamagen_dirs import write_random_model_dir

    model_dir = CACHE / name
    if not (model_dir / "config.json").is_file():
        print(f"[bench] writing random {name} weights to {model_dir} (once)")
        write_random_model_dir(model_dir, with_vq=False, seed=0, std=0.25, **shape)
    return model_dir


# A reduced Emu3-Gen (the real one: hidden 4096, 32 layers, 32 heads, 8 KV heads, codebook 32768) that fits
# this CPU, in the Hugging Face layout, with the real codebook and the real 720x720 -> 90x90 grid.
EMU3_REDUCED = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=704,
    codebook_size=32768,
    max_position_embeddings=9216,
    image_area=720 * 720,
)
# --quick: the same layers, a small codebook, 128x128 -> 16x16.
EMU3_SMALL = {**EMU3_REDUCED, "codebook_size": 1024, "image_area": 128 * 128}


def random_emu3(name: str, shape: dict[str, Any]) -> Path:
    """A random Emu3 directory in the Hugging Face layout (config, safetensors, tokenizer), written once."""
    from vllm_zipar.testing.emu3_dirs import write_random_emu3_dir

    model_dir = CACHE / name
    if not (model_dir / "config.json").is_file():
        print(f"[bench] writing random {name} weights to {model_dir} (once)")
        write_random_emu3_dir(model_dir, seed=0, **shape)
    return model_dir


# A reduced Janus-Pro (the real 1B: hidden 2048, 24 layers, 16 heads of 128, no GQA, codebook 16384) that
# fits this CPU, in the Hugging Face layout, with the real codebook and the real 384 px -> 24x24 grid (the
# toy VQ here downsamples 2x, so its pixels are 48; the benchmark generates tokens only).
JANUS_REDUCED = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=704,
    grid=24,
    codebook_size=16384,
)
# --quick: the same layers, a small codebook, an 8x8 grid.
JANUS_SMALL = {**JANUS_REDUCED, "grid": 8, "codebook_size": 1024}


def random_janus(name: str, shape: dict[str, Any]) -> Path:
    """A random Janus-Pro directory in the Hugging Face layout (weights, processor), written once."""
    from vllm_zipar.testing.janus_dirs import write_random_janus_dir

    model_dir = CACHE / name
    if not (model_dir / "config.json").is_file():
        print(f"[bench] writing random {name} weights to {model_dir} (once)")
        write_random_janus_dir(model_dir, seed=0, **shape)
    return model_dir


# A reduced Lumina-mGPT-7B-768 (the real one: hidden 4096, 32 layers, 32 heads of 128, vocabulary 65,536,
# codebook 8192) that fits this CPU, in its Hugging Face layout, with the real vocabulary and codebook and the
# real 768 px -> 48x48 grid (Meta's VQGAN here is a tiny random one; the benchmark generates tokens only).
LUMINA_REDUCED = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=704,
    vocab_size=65536,
    codebook_size=8192,
    image_size=768,
)
# --quick: the same layers, a small vocabulary and codebook, 128 px -> 8x8.
LUMINA_SMALL = {**LUMINA_REDUCED, "vocab_size": 4096, "codebook_size": 1024, "image_size": 128}


def random_lumina(name: str, shape: dict[str, Any]) -> Path:
    """A random Lumina-mGPT directory in its Hugging Face layout (weights, tokenizer, VQGAN), written once."""
    from vllm_zipar.testing.lumina_dirs import write_tiny_lumina_dir

    model_dir = CACHE / name
    if not (model_dir / "config.json").is_file():
        print(f"[bench] writing random {name} weights to {model_dir} (once)")
        write_tiny_lumina_dir(model_dir, seed=0, **shape)
    return model_dir


def timed_images(generator, prompt, count: int, window: int | None, label: str, *, eol: bool, **kwargs):
    """`count` images of `prompt` (seeds 0..count-1) submitted together: (wall seconds, images). Every
    image's pass count must equal the closed form (ZIPAR.md §4; `eol`: the layout has an EOL column)."""
    import time

    from vllm_zipar.zipar.plan import zipar_steps

    decoding = {"decoding": "ntp"} if window is None else {"zipar_window": window}
    start = time.perf_counter()
    images = generator.generate([prompt] * count, seeds=list(range(count)), **decoding, **kwargs)
    seconds = time.perf_counter() - start
    for image in images:
        rows, cols = image.tokens.shape
        expected = zipar_steps(rows, cols, window, eol=eol)
        if image.passes != expected:
            raise SystemExit(
                f"{label}: the engine took {image.passes} passes, the closed form says {expected}"
            )
    return seconds, images


def measure_in_flight(
    generator, prompt, label: str, window: int | None, in_flight: int, repeats: int, *, eol: bool, **kwargs
) -> dict[str, Any]:
    """One benchmark row: seconds per image with 1 and with `in_flight` images decoded together, each point
    the fastest of `repeats` runs (the machine may be shared), and the image's passes."""
    runs = [timed_images(generator, prompt, 1, window, label, eol=eol, **kwargs) for _ in range(repeats)]
    one_s, (image,) = min(runs, key=lambda run: run[0])
    many_s = min(
        timed_images(generator, prompt, in_flight, window, label, eol=eol, **kwargs)[0]
        for _ in range(repeats)
    )
    row = {
        "mode": label,
        "window": window,
        "cfg_scale": image.cfg_scale,
        "grid": list(image.tokens.shape),
        "passes_per_image": image.passes,
        "seconds_per_image_1_in_flight": one_s,
        f"seconds_per_image_{in_flight}_in_flight": many_s / in_flight,
        "repeats": repeats,
        "mean_cells_per_pass": sum(image.cells_per_pass) / len(image.cells_per_pass),
    }
    print(
        f"[bench] {label:9s} passes {image.passes:5d}  {one_s:7.2f} s/image at 1 in flight  "
        f"{many_s / in_flight:7.3f} s/image at {in_flight} in flight",
        flush=True,
    )
    return row


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def bar_plot(name: str, title: str, panels: list[tuple[str, list[str], list[float]]]) -> Path:
    """One bar chart per panel (label, bar names, values), side by side, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (label, names, values) in zip(axes, panels, strict=True):
        bars = ax.bar(names, values, color=["#888888"] + ["#2a7fbf"] * (len(names) - 1))
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, name)


def save_figure(fig, name: str) -> Path:
    """Write a matplotlib figure as RESULTS/<name>.png and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
