"""Exact drafts on the shipped, trained digits model: passes per image and seconds per image for NTP and
ZipAR-16/8/4, each with zipar_drafts L = 0/2/4/8 (docs/exact_drafts.md, issue 24 item 4).

Every row decodes the same images (labels 0-9 in turn, seeds SEED + i, the model's sampling defaults: CFG
1.3, temperature 0.3), all in flight at once, through `ImageGenerator` (vLLM's engine, CPU). For each
decoding the script asserts that every L gives exactly the tokens of L = 0 (ZipAR-16 and NTP: also each
other's), then reports passes per image (prefill included), seconds per image (wall time of the batch over
its images, after a warm-up), and per image the tokens fed after the prefill, the drafts among them, the
accepted drafts and the superseded KV slots (conditional stream; a guided image feeds each token twice).

`--model-shape` picks the model: `digits` (default, the trained model above), `llamagen-b` (random weights
in LlamaGen-B's shape on its 24x24 grid, class labels 0-9) or `emu3-reduced` (a random reduced Emu3 with
the real codebook at 720x720 -> 90x90 plus EOLs, one text prompt): benchmarks/common.py's shapes, as
zipar_vs_ntp.py and zipar_vs_ntp_emu3.py build them. Random weights give near-flat distributions where the
noise alone picks the token, so the drafts' acceptance there says little about a real model.

A draft image's sequence also holds its superseded tokens: the digits engine gets `max_model_len` 16384 (the
family's 578 fits plain ZipAR); the random shapes get the family's length plus `draft_headroom` for the
largest L (`ImageGenerator(zipar_drafts=max L)`, serving/engine_args.py). Each row reports the superseded
KV slots per image and per cell (the overhead of the drafts, conditional stream).

    python benchmarks/exact_drafts.py                                 # digits, 20 images
    python benchmarks/exact_drafts.py --model-shape llamagen-b        # random LlamaGen-B 24x24, 2 images
    python benchmarks/exact_drafts.py --model-shape emu3-reduced      # random reduced Emu3 90x90, 2 images

`--quick`: two images, NTP and ZipAR-8 with L = 0 and 2 (random shapes: their small stand-ins, a 16x16
grid), for a smoke run. Writes `results/exact_drafts.json` (`exact_drafts_llamagen_b`, `exact_drafts_emu3`
for the random shapes) and `.png` (`_quick` for --quick) after every row; a run of some `--decodings` keeps
the rows of the others already there (same images and sampling), so a long run can be split.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    EMU3_REDUCED,
    EMU3_SMALL,
    LLAMAGEN_B_24,
    SMALL_16,
    machine,
    random_emu3,
    random_model,
    save_figure,
    write_json,
)

MAX_MODEL_LEN = 16384  # the digits model's engine (the random shapes: the family's plus draft headroom)
EMU3_PROMPT = "a red apple on a wooden table"  # as zipar_vs_ntp_emu3.py
# --model-shape -> (results name, random model writer, its shape, its --quick stand-in); digits: shipped.
RANDOM_SHAPES = {
    "llamagen-b": (
        "exact_drafts_llamagen_b",
        random_model,
        ("llamagen-b-24", LLAMAGEN_B_24),
        ("small-16", SMALL_16),
    ),
    "emu3-reduced": (
        "exact_drafts_emu3",
        random_emu3,
        ("emu3-reduced-90", EMU3_REDUCED),
        ("emu3-small-16", EMU3_SMALL),
    ),
}
DECODINGS = {"NTP": None, "ZipAR-16": 16, "ZipAR-8": 8, "ZipAR-4": 4}  # name -> window


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=str(ROOT / "models" / "digits"), help="the digits model's directory"
    )
    parser.add_argument("--model-shape", default="digits", choices=["digits", *RANDOM_SHAPES])
    parser.add_argument("--images", type=int, default=None, help="images per row (default 20; 2 random)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="guidance (default: the model's)")
    parser.add_argument("--seed", type=int, default=1000, help="image i uses seed SEED + i")
    parser.add_argument("--drafts", type=int, nargs="+", default=[0, 2, 4, 8])
    parser.add_argument("--decodings", nargs="+", default=list(DECODINGS), choices=list(DECODINGS))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    parser.add_argument("--quick", action="store_true", help="2 images, NTP and ZipAR-8, L = 0 and 2")
    args = parser.parse_args(argv)
    if args.images is None:
        args.images = 20 if args.model_shape == "digits" else 2
    if args.quick:
        args.images, args.drafts, args.decodings = 2, [0, 2], ["NTP", "ZipAR-8"]
    if 0 not in args.drafts:
        args.drafts = [0, *args.drafts]  # the tokens every L is checked against
    return args


def run_row(generator, labels, seeds, window, drafts, cfg_scale=None) -> tuple[list, float]:
    kwargs = {"decoding": "ntp"} if window is None else {"zipar_window": window}
    if cfg_scale is not None:
        kwargs["cfg_scale"] = cfg_scale
    start = time.perf_counter()
    images = generator.generate(labels, seeds=seeds, zipar_drafts=drafts, **kwargs)
    return images, time.perf_counter() - start


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def plot(rows: list[dict], name: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decodings = list(dict.fromkeys(row["mode"] for row in rows))
    drafts = sorted({row["drafts"] for row in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(drafts)
    for k, L in enumerate(drafts):
        for ax, key in zip(axes, ("passes_per_image", "seconds_per_image"), strict=True):
            values = [next(r[key] for r in rows if r["mode"] == d and r["drafts"] == L) for d in decodings]
            bars = ax.bar([i + k * width for i in range(len(decodings))], values, width, label=f"L = {L}")
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
    for ax, label in zip(axes, ("forward passes per image", "seconds per image (CPU)"), strict=True):
        ax.set_xticks([i + width * (len(drafts) - 1) / 2 for i in range(len(decodings))], decodings)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from vllm_zipar.serving.offline import ImageGenerator

    model_dir, engine = model_and_engine(args)
    prompts = [EMU3_PROMPT] * args.images if args.model_shape == "emu3-reduced" else None
    labels = prompts or [i % 10 for i in range(args.images)]
    seeds = [args.seed + i for i in range(args.images)]
    scale = args.cfg_scale
    rows: list[dict] = []
    with ImageGenerator(model_dir, decoding="ntp", max_num_seqs=max(2, args.images), **engine) as generator:
        sampling = generator.model.sampling_defaults
        args.max_model_len = generator.llm.llm_engine.vllm_config.model_config.max_model_len
        args.model_name = Path(model_dir).name
        run_row(generator, labels[:1], seeds[:1], 8, 2, scale)  # warm-up: start-up costs out of the first row
        reference: dict[str, torch.Tensor] = {}
        for name in args.decodings:
            window = DECODINGS[name]
            for drafts in args.drafts:
                images, seconds = run_row(generator, labels, seeds, window, drafts, scale)
                tokens = torch.stack([image.tokens for image in images])
                if drafts == 0:
                    reference[name] = tokens
                equal = torch.equal(tokens, reference[name])
                assert equal, f"{name} with L = {drafts}: tokens differ from L = 0"
                stats = [image.stats for image in images]
                row = {
                    "mode": name,
                    "window": window,
                    "drafts": drafts,
                    "passes_per_image": mean(image.passes for image in images),
                    "max_passes": max(image.passes for image in images),
                    "seconds_per_image": seconds / len(images),
                    # Plain ZipAR (L = 0) reports no draft counts: it feeds each position once.
                    "fed_per_image": mean(s.fed for s in stats) if drafts else None,
                    "draft_tokens_per_image": mean(s.draft_tokens for s in stats),
                    "accepted_per_image": mean(s.accepted for s in stats),
                    "superseded_per_image": mean(s.superseded for s in stats),
                    # The drafts' KV overhead: dead slots per grid cell (conditional stream; x2 with CFG).
                    "superseded_per_cell": mean(s.superseded / (s.grid[0] * s.grid[1]) for s in stats),
                    "tokens_equal_to_l0": equal,
                }
                rows.append(row)
                save(args, rows, seeds, sampling)
                counts = (
                    f", fed {row['fed_per_image']:.0f}, drafts {row['draft_tokens_per_image']:.0f}, accepted "
                    f"{row['accepted_per_image']:.0f}, superseded {row['superseded_per_image']:.0f} "
                    f"({row['superseded_per_cell']:.2f} per cell)"
                    if drafts
                    else ""
                )
                print(
                    f"{name:9s} L={drafts}: {row['passes_per_image']:6.1f} passes/image (max "
                    f"{row['max_passes']}), {row['seconds_per_image']:.3f} s/image{counts}; tokens = L=0's",
                    flush=True,
                )
        # ZipAR-w decodes in NTP order when w >= the grid width (16 on the digits model, not on 24x24).
        width = generator.grid_shape[1]
        if "NTP" in reference and "ZipAR-16" in reference and DECODINGS["ZipAR-16"] >= width:
            assert torch.equal(reference["NTP"], reference["ZipAR-16"]), "ZipAR-16 differs from NTP"
    path = save(args, rows, seeds, sampling)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def model_and_engine(args) -> tuple[Path, dict]:
    """The model directory of `--model-shape` and the engine kwargs that give its draft images room."""
    if args.model_shape == "digits":
        return Path(args.model), dict(
            max_model_len=MAX_MODEL_LEN, hf_overrides={"max_position_embeddings": MAX_MODEL_LEN}
        )
    _, write, full, quick = RANDOM_SHAPES[args.model_shape]
    name, shape = quick if args.quick else full
    return write(name, shape), dict(zipar_drafts=max(args.drafts))


def results_name(args) -> str:
    base = "exact_drafts" if args.model_shape == "digits" else RANDOM_SHAPES[args.model_shape][0]
    return f"{base}_quick" if args.quick else base


def save(args, rows: list[dict], seeds: list[int], sampling) -> Path:
    """Write the JSON and plot: this run's rows, plus the rows of other decodings from an earlier run of
    the same images and sampling."""
    import json

    from benchmarks.common import RESULTS

    name = results_name(args)
    earlier = RESULTS / f"{name}.json"
    ours = {row["mode"] for row in rows}
    kept: list[dict] = []
    if earlier.is_file():
        old = json.loads(earlier.read_text())
        cfg = sampling.cfg_scale if args.cfg_scale is None else args.cfg_scale
        same = old.get("sampling", {}).get("cfg_scale") == cfg and old.get("model") == args.model_name
        if same and old.get("images_per_row") == args.images and old.get("seeds") == [seeds[0], seeds[-1]]:
            kept = [row for row in old["rows"] if row["mode"] not in ours]
    order = list(DECODINGS)
    rows = sorted(kept + rows, key=lambda row: (order.index(row["mode"]), row["drafts"]))
    result = {
        "model": args.model_name,
        "model_shape": args.model_shape,
        "images_per_row": args.images,
        "seeds": [seeds[0], seeds[-1]],
        "sampling": {
            "cfg_scale": sampling.cfg_scale if args.cfg_scale is None else args.cfg_scale,
            "temperature": sampling.temperature,
            "top_k": sampling.top_k,
            "top_p": sampling.top_p,
        },
        "max_model_len": args.max_model_len,
        "rows": rows,
        "machine": machine(),
    }
    path = write_json(name, result)
    cfg = sampling.cfg_scale if args.cfg_scale is None else args.cfg_scale
    title = (
        f"exact drafts, {args.model_name}, {args.images} images in flight, CFG {cfg:g}, "
        f"T {sampling.temperature:g}: the same tokens at every L"
    )
    if len({row["drafts"] for row in rows}) * len({row["mode"] for row in rows}) == len(rows):
        plot(rows, name, title)
    return path


if __name__ == "__main__":
    sys.exit(main())
