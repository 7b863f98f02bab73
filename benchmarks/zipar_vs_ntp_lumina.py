"""ZipAR vs NTP on Lumina-mGPT's layout: text prompt, 768 px -> 48x48 grid with an EOL per row, guided.

    python benchmarks/zipar_vs_ntp_lumina.py           # reduced Lumina, 48x48 grid, ZipAR-16/15/8
    python benchmarks/zipar_vs_ntp_lumina.py --quick   # 8x8 grid, small codebook: a smoke run

The model is a random Lumina-mGPT in its Hugging Face layout (benchmarks/common.py: LUMINA_REDUCED: the real
vocabulary, codebook and 48x48 grid, fewer and narrower layers), guided at the family default (CFG 4, image
top-k 2000: each image is one request holding its conditional stream and Lumina's unconditional context).
Each mode runs with 1 image in flight, then with `--in-flight` images (default 4) submitted together;
seconds per image are wall time over images, the fastest of `--repeats` runs. Pass counts are the engine's
for every image, checked against the closed form (ZIPAR.md §4 with an EOL column: NTP H·W, its forced EOLs
riding in the pass before them; ZipAR-w (H-1)·w + W). The second baseline is Lumina's own generate loop,
one pass per generated token: BOI and the two size tokens, every row with its EOL, EOI and the turn end,
H·(W+1) + 5. ZipAR-15 is the ZipAR authors' default `--zipar_window_size 16` (their N is our N-1:
docs/reference_oracle.md). Ratios are measured in one run on one engine. Writes
benchmarks/results/zipar_vs_ntp_lumina[_quick].json and .png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    LUMINA_REDUCED,
    LUMINA_SMALL,
    bar_plot,
    machine,
    measure_in_flight,
    random_lumina,
    timed_images,
    write_json,
)

PROMPT = "a red apple on a wooden table"


def generate_loop_passes(rows: int, cols: int) -> int:
    """Lumina's own `generate`: one pass per generated token (BOI, h, w, rows with EOLs, EOI, turn end)."""
    return 3 + rows * (cols + 1) + 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="8x8 grid and a small codebook")
    parser.add_argument("--windows", type=int, nargs="*", default=None, help="default 16 15 8 (quick: 4)")
    parser.add_argument("--in-flight", type=int, default=None, help="images decoded together (default 4)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per point, fastest counts (default 1)")
    args = parser.parse_args(argv)

    from vllm_zipar.serving.offline import ImageGenerator

    if args.quick:
        name, shape, windows, in_flight = "lumina-small-8", LUMINA_SMALL, [4], 2
    else:
        name, shape, windows, in_flight = "lumina-reduced-48", LUMINA_REDUCED, [16, 15, 8], 4
    windows = args.windows or windows
    in_flight = args.in_flight or in_flight
    model_dir = random_lumina(name, shape)
    # A guided image holds two sequences, so the engine may need 2 per image in flight.
    with ImageGenerator(model_dir, max_num_seqs=2 * in_flight, kv_cache_memory_bytes=1 << 30) as generator:
        # The first image pays for allocations and kernel selection.
        timed_images(generator, PROMPT, 1, windows[-1], "warm-up", eol=True)
        rows = [
            measure_in_flight(generator, PROMPT, label, window, in_flight, args.repeats, eol=True)
            for label, window in [("NTP", None)] + [(f"ZipAR-{w}", w) for w in windows]
        ]

    many_key = f"seconds_per_image_{in_flight}_in_flight"
    ntp = rows[0]
    for row in rows:
        row["generate_loop_passes"] = generate_loop_passes(*row["grid"])
        row["passes_ratio_ntp_over_this"] = ntp["passes_per_image"] / row["passes_per_image"]
        row["passes_ratio_generate_over_this"] = row["generate_loop_passes"] / row["passes_per_image"]
        row["latency_ratio_ntp_over_this_1_in_flight"] = (
            ntp["seconds_per_image_1_in_flight"] / row["seconds_per_image_1_in_flight"]
        )
        row[f"ratio_ntp_over_this_{in_flight}_in_flight"] = ntp[many_key] / row[many_key]

    grid = "x".join(map(str, ntp["grid"]))
    print(f"\nmodel {name} ({shape}), grid {grid} + EOL column, CFG {ntp['cfg_scale']:g}, one engine")
    print(
        f"{'mode':9s} {'passes':>7s} {'vs NTP':>7s} {'vs generate()':>14s} {'s/img@1':>9s} {'NTP/this':>9s} "
        f"{'s/img@' + str(in_flight):>9s} {'NTP/this':>9s}"
    )
    for row in rows:
        print(
            f"{row['mode']:9s} {row['passes_per_image']:7d} {row['passes_ratio_ntp_over_this']:7.2f} "
            f"{row['passes_ratio_generate_over_this']:14.2f} {row['seconds_per_image_1_in_flight']:9.2f} "
            f"{row['latency_ratio_ntp_over_this_1_in_flight']:9.2f} {row[many_key]:9.2f} "
            f"{row[f'ratio_ntp_over_this_{in_flight}_in_flight']:9.2f}"
        )
    suffix = "_quick" if args.quick else ""
    result = {"model": name, "shape": shape, "in_flight": in_flight, "machine": machine(), "rows": rows}
    json_path = write_json(f"zipar_vs_ntp_lumina{suffix}", result)
    names = [row["mode"] for row in rows]
    png = bar_plot(
        f"zipar_vs_ntp_lumina{suffix}",
        f"ZipAR vs NTP, Lumina-mGPT layout ({name}, {grid} grid + EOL, CFG {ntp['cfg_scale']:g}), "
        "same vLLM engine (CPU)",
        [
            ("forward passes per image", names, [row["passes_per_image"] for row in rows]),
            (
                "seconds per image (1 in flight)",
                names,
                [row["seconds_per_image_1_in_flight"] for row in rows],
            ),
            (f"seconds per image ({in_flight} in flight)", names, [row[many_key] for row in rows]),
        ],
    )
    print(f"\nwrote {json_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
