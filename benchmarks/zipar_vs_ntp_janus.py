"""ZipAR vs NTP on Janus-Pro's layout: chat-template text prompt, 24x24 grid, guided, in the same vLLM engine.

    python benchmarks/zipar_vs_ntp_janus.py           # reduced Janus-Pro shape, 24x24 grid, ZipAR-16/12/8
    python benchmarks/zipar_vs_ntp_janus.py --quick   # 8x8 grid, small codebook: a smoke run

The model is a random Janus-Pro in the Hugging Face layout (benchmarks/common.py: JANUS_REDUCED, the real
codebook and grid, fewer and narrower layers), guided at the family default (CFG 5: each image is one
request holding its conditional and unconditional sequences), sampled with the family defaults. Each mode
runs with 1 image in flight, then with `--in-flight` images (default 16) submitted together; seconds per
image are wall time over images, the fastest of `--repeats` runs (default 3). Pass counts are the
engine's, for every image, and are checked against the closed form (no EOL column, ZIPAR.md §4): NTP H·W,
ZipAR-w 2W + (H-2)·w. Ratios are measured in one run on one engine. Writes
benchmarks/results/zipar_vs_ntp_janus[_quick].json and .png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    JANUS_REDUCED,
    JANUS_SMALL,
    bar_plot,
    machine,
    measure_in_flight,
    random_janus,
    timed_images,
    write_json,
)

PROMPT = "a red apple on a wooden table"
CFG_SCALE = 5.0  # Janus-Pro's generation_config guidance_scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="8x8 grid and a small codebook")
    parser.add_argument("--windows", type=int, nargs="*", default=None, help="default 16 12 8 (quick: 4)")
    parser.add_argument("--in-flight", type=int, default=None, help="images decoded together (default 16)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per point, fastest counts (default 3)"
    )
    args = parser.parse_args(argv)

    from vllm_zipar.serving.offline import ImageGenerator

    if args.quick:
        name, shape, windows, in_flight = "janus-small-8", JANUS_SMALL, [4], 2
    else:
        name, shape, windows, in_flight = "janus-reduced-24", JANUS_REDUCED, [16, 12, 8], 16
    windows = args.windows or windows
    in_flight = args.in_flight or in_flight
    repeats = args.repeats or (1 if args.quick else 3)
    model_dir = random_janus(name, shape)
    # A guided image holds two sequences, so the engine may need 2 per image in flight.
    with ImageGenerator(model_dir, max_num_seqs=2 * in_flight, kv_cache_memory_bytes=1 << 30) as generator:
        # The first images pay for allocations and kernel selection.
        timed_images(generator, PROMPT, 1, windows[-1], "warm-up", eol=False, cfg_scale=CFG_SCALE)
        rows = [
            measure_in_flight(
                generator, PROMPT, label, window, in_flight, repeats, eol=False, cfg_scale=CFG_SCALE
            )
            for label, window in [("NTP", None)] + [(f"ZipAR-{w}", w) for w in windows]
        ]

    many_key = f"seconds_per_image_{in_flight}_in_flight"
    ntp = rows[0]
    for row in rows:
        row["passes_ratio_ntp_over_this"] = ntp["passes_per_image"] / row["passes_per_image"]
        row["latency_ratio_ntp_over_this_1_in_flight"] = (
            ntp["seconds_per_image_1_in_flight"] / row["seconds_per_image_1_in_flight"]
        )
        row[f"ratio_ntp_over_this_{in_flight}_in_flight"] = ntp[many_key] / row[many_key]

    grid = "x".join(map(str, ntp["grid"]))
    print(f"\nmodel {name} ({shape}), grid {grid}, CFG {CFG_SCALE:g}, one engine, same weights")
    print(
        f"{'mode':9s} {'passes':>7s} {'vs NTP':>7s} {'s/img@1':>9s} {'NTP/this':>9s} "
        f"{'s/img@' + str(in_flight):>9s} {'NTP/this':>9s}"
    )
    for row in rows:
        one_ratio = row["latency_ratio_ntp_over_this_1_in_flight"]
        many_ratio = row[f"ratio_ntp_over_this_{in_flight}_in_flight"]
        print(
            f"{row['mode']:9s} {row['passes_per_image']:7d} {row['passes_ratio_ntp_over_this']:7.2f} "
            f"{row['seconds_per_image_1_in_flight']:9.2f} {one_ratio:9.2f} "
            f"{row[many_key]:9.3f} {many_ratio:9.2f}"
        )
    suffix = "_quick" if args.quick else ""
    result = {
        "model": name,
        "shape": shape,
        "cfg_scale": CFG_SCALE,
        "in_flight": in_flight,
        "machine": machine(),
        "rows": rows,
    }
    json_path = write_json(f"zipar_vs_ntp_janus{suffix}", result)
    names = [row["mode"] for row in rows]
    png = bar_plot(
        f"zipar_vs_ntp_janus{suffix}",
        f"ZipAR vs NTP, Janus-Pro layout ({name}, {grid} grid, CFG {CFG_SCALE:g}), same vLLM engine (CPU)",
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
