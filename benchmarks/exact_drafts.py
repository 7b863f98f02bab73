"""Exact drafts on the shipped, trained digits model: passes per image and seconds per image for NTP and
ZipAR-16/8/4, each with zipar_drafts L = 0/2/4/8 (docs/exact_drafts.md, issue 24 item 4).

Every row decodes the same images (labels 0-9 in turn, seeds SEED + i, the model's sampling defaults: CFG
1.3, temperature 0.3), all in flight at once, through `ImageGenerator` (vLLM's engine, CPU). For each
decoding the script asserts that every L gives exactly the tokens of L = 0 (ZipAR-16 and NTP: also each
other's), then reports passes per image (prefill included), seconds per image (wall time of the batch over
its images, after a warm-up), and per image the tokens fed after the prefill, the drafts among them, the
accepted drafts and the superseded KV slots (conditional stream; a guided image feeds each token twice).

The engine gets `max_model_len` 16384 (the family's 578 fits plain ZipAR): a draft image's sequence also
holds its superseded tokens. `--quick`: two images, NTP and ZipAR-8 with L = 0 and 2, for the test suite.
Writes `results/exact_drafts.json` and `.png` (`_quick` for --quick) after every row; a run of some
`--decodings` keeps the rows of the others already there (same images and sampling), so a long run can be
split.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, save_figure, write_json  # noqa: E402

MAX_MODEL_LEN = 16384
DECODINGS = {"NTP": None, "ZipAR-16": 16, "ZipAR-8": 8, "ZipAR-4": 4}  # name -> window


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "digits"))
    parser.add_argument("--images", type=int, default=20, help="images per row (labels 0-9 in turn)")
    parser.add_argument("--seed", type=int, default=1000, help="image i uses seed SEED + i")
    parser.add_argument("--drafts", type=int, nargs="+", default=[0, 2, 4, 8])
    parser.add_argument("--decodings", nargs="+", default=list(DECODINGS), choices=list(DECODINGS))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    parser.add_argument("--quick", action="store_true", help="2 images, NTP and ZipAR-8, L = 0 and 2")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.drafts, args.decodings = 2, [0, 2], ["NTP", "ZipAR-8"]
    if 0 not in args.drafts:
        args.drafts = [0, *args.drafts]  # the tokens every L is checked against
    return args


def run_row(generator, labels, seeds, window, drafts) -> tuple[list, float]:
    kwargs = {"decoding": "ntp"} if window is None else {"zipar_window": window}
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

    labels = [i % 10 for i in range(args.images)]
    seeds = [args.seed + i for i in range(args.images)]
    engine = dict(max_model_len=MAX_MODEL_LEN, hf_overrides={"max_position_embeddings": MAX_MODEL_LEN})
    rows: list[dict] = []
    with ImageGenerator(args.model, decoding="ntp", max_num_seqs=max(2, args.images), **engine) as generator:
        sampling = generator.model.sampling_defaults
        run_row(generator, labels[:1], seeds[:1], 8, 2)  # warm-up: start-up costs out of the first row
        reference: dict[str, torch.Tensor] = {}
        for name in args.decodings:
            window = DECODINGS[name]
            for drafts in args.drafts:
                images, seconds = run_row(generator, labels, seeds, window, drafts)
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
                    "tokens_equal_to_l0": equal,
                }
                rows.append(row)
                save(args, rows, seeds, sampling)
                counts = (
                    f", fed {row['fed_per_image']:.0f}, drafts {row['draft_tokens_per_image']:.0f}, accepted "
                    f"{row['accepted_per_image']:.0f}, superseded {row['superseded_per_image']:.0f}"
                    if drafts
                    else ""
                )
                print(
                    f"{name:9s} L={drafts}: {row['passes_per_image']:6.1f} passes/image (max "
                    f"{row['max_passes']}), {row['seconds_per_image']:.3f} s/image{counts}; tokens = L=0's",
                    flush=True,
                )
        if "NTP" in reference and "ZipAR-16" in reference:
            assert torch.equal(reference["NTP"], reference["ZipAR-16"]), "ZipAR-16 differs from NTP"
    path = save(args, rows, seeds, sampling)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def save(args, rows: list[dict], seeds: list[int], sampling) -> Path:
    """Write the JSON and plot: this run's rows, plus the rows of other decodings from an earlier run of
    the same images and sampling."""
    import json

    from benchmarks.common import RESULTS

    name = "exact_drafts_quick" if args.quick else "exact_drafts"
    earlier = RESULTS / f"{name}.json"
    ours = {row["mode"] for row in rows}
    kept: list[dict] = []
    if earlier.is_file():
        old = json.loads(earlier.read_text())
        if old.get("images_per_row") == args.images and old.get("seeds") == [seeds[0], seeds[-1]]:
            kept = [row for row in old["rows"] if row["mode"] not in ours]
    order = list(DECODINGS)
    rows = sorted(kept + rows, key=lambda row: (order.index(row["mode"]), row["drafts"]))
    result = {
        "model": Path(args.model).name,
        "images_per_row": args.images,
        "seeds": [seeds[0], seeds[-1]],
        "sampling": {
            "cfg_scale": sampling.cfg_scale,
            "temperature": sampling.temperature,
            "top_k": sampling.top_k,
            "top_p": sampling.top_p,
        },
        "max_model_len": MAX_MODEL_LEN,
        "rows": rows,
        "machine": machine(),
    }
    path = write_json(name, result)
    title = (
        f"exact drafts, digits model, {args.images} images in flight, CFG {sampling.cfg_scale:g}, "
        f"T {sampling.temperature:g}: the same tokens at every L"
    )
    if len({row["drafts"] for row in rows}) * len({row["mode"] for row in rows}) == len(rows):
        plot(rows, name, title)
    return path


if __name__ == "__main__":
    sys.exit(main())
