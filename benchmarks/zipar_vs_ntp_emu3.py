"""ZipAR vs NTP on Emu3-Gen's layout: text prompt, 90x90 grid with an EOL per row, in the same vLLM engine.

    python benchmarks/zipar_vs_ntp_emu3.py           # reduced Emu3 shape, 720x720 -> 90x90, ZipAR-16/8/4
    python benchmarks/zipar_vs_ntp_emu3.py --quick   # 16x16 grid, small codebook: a smoke run

The model is a random Emu3 in the Hugging Face layout (benchmarks/common.py: EMU3_REDUCED, the real
codebook and grid, fewer and narrower layers), one image in flight, no guidance. Pass counts are the
engine's (NTP: H·W, forced EOLs fused into the pass before them; ZipAR: (H-1)·w + W) and are checked
against the closed form; a plain transformers `generate()` loop would spend H·(W+1) - 1 passes on the grid
plus one per closing token. Ratios are measured in one run on one engine. Writes
benchmarks/results/zipar_vs_ntp_emu3[_quick].json and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import EMU3_REDUCED, EMU3_SMALL, bar_plot, machine, random_emu3, write_json  # noqa: E402

PROMPT = "a red apple on a wooden table"


def measure(generator, label: str, window: int | None, repeats: int) -> dict:
    from vllm_zipar.zipar.plan import zipar_steps

    kwargs = {"decoding": "ntp"} if window is None else {"zipar_window": window}
    seconds = []
    for seed in range(repeats):
        start = time.perf_counter()
        (image,) = generator.generate([PROMPT], seeds=[seed], cfg_scale=1.0, **kwargs)
        seconds.append(time.perf_counter() - start)
    rows, cols = image.tokens.shape
    expected = zipar_steps(rows, cols, window, eol=True)
    if image.passes != expected:
        raise SystemExit(f"{label}: the engine took {image.passes} passes, the closed form says {expected}")
    row = {
        "mode": label,
        "window": window,
        "grid": [rows, cols],
        "passes_per_image": image.passes,
        "generate_loop_passes": rows * (cols + 1) - 1 + 4,  # grid, then EOL, EOF, image end, EOS
        "seconds_per_image": min(seconds),
        "mean_cells_per_pass": sum(image.cells_per_pass) / len(image.cells_per_pass),
    }
    print(f"[bench] {label:9s} passes {image.passes:5d}  {row['seconds_per_image']:8.2f} s/image", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="16x16 grid and a small codebook")
    parser.add_argument("--windows", type=int, nargs="*", default=[16, 8, 4])
    parser.add_argument("--repeats", type=int, default=1, help="images per mode (the fastest one counts)")
    args = parser.parse_args(argv)

    from vllm_zipar.serving.offline import ImageGenerator

    name, shape = ("emu3-small-16", EMU3_SMALL) if args.quick else ("emu3-reduced-90", EMU3_REDUCED)
    windows = [w for w in args.windows if not args.quick or w < 16] or [4]
    model_dir = random_emu3(name, shape)
    with ImageGenerator(model_dir, max_num_seqs=4) as generator:
        generator.generate([PROMPT], seeds=[0], cfg_scale=1.0, zipar_window=4)  # warm-up
        rows = [measure(generator, "NTP", None, args.repeats)]
        rows += [measure(generator, f"ZipAR-{w}", w, args.repeats) for w in windows]
    ntp = rows[0]
    for row in rows:
        row["passes_ratio_ntp_over_this"] = ntp["passes_per_image"] / row["passes_per_image"]
        row["passes_ratio_generate_over_this"] = row["generate_loop_passes"] / row["passes_per_image"]
        row["latency_ratio_ntp_over_this"] = ntp["seconds_per_image"] / row["seconds_per_image"]
        row["fewer_passes_than_generate"] = 1 - row["passes_per_image"] / row["generate_loop_passes"]

    grid = "x".join(map(str, ntp["grid"]))
    print(f"\nmodel {name} ({shape}), grid {grid} + EOL column, one engine, same weights, 1 image in flight")
    print(
        f"{'mode':9s} {'passes':>7s} {'vs NTP':>7s} {'vs generate()':>14s} {'s/image':>9s} {'NTP/this':>9s}"
    )
    for row in rows:
        print(
            f"{row['mode']:9s} {row['passes_per_image']:7d} {row['passes_ratio_ntp_over_this']:7.2f} "
            f"{row['passes_ratio_generate_over_this']:14.2f} {row['seconds_per_image']:9.2f} "
            f"{row['latency_ratio_ntp_over_this']:9.2f}"
        )
    suffix = "_quick" if args.quick else ""
    json_path = write_json(
        f"zipar_vs_ntp_emu3{suffix}", {"model": name, "shape": shape, "machine": machine(), "rows": rows}
    )
    names = [row["mode"] for row in rows]
    png = bar_plot(
        f"zipar_vs_ntp_emu3{suffix}",
        f"ZipAR vs NTP, Emu3 layout ({name}, {grid} grid), same vLLM engine (CPU)",
        [
            ("forward passes per image", names, [row["passes_per_image"] for row in rows]),
            ("seconds per image", names, [row["seconds_per_image"] for row in rows]),
        ],
    )
    print(f"\nwrote {json_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
