"""ZipAR vs NTP in the same vLLM engine, same weights: passes, seconds per image, images per second.

    python benchmarks/zipar_vs_ntp.py            # LlamaGen-B shape, 24x24 grid, windows 16/12/8/4
    python benchmarks/zipar_vs_ntp.py --quick    # small model, 16x16 grid: a smoke run of a minute or two

Ratios are measured in one run on one engine. Writes benchmarks/results/zipar_vs_ntp[_quick].json and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LLAMAGEN_B_24, SMALL_16, bar_plot, machine, random_model, write_json  # noqa: E402


def timed_generate(generator, count: int, window: int | None) -> tuple[float, list]:
    kwargs = {"decoding": "ntp"} if window is None else {"zipar_window": window}
    start = time.perf_counter()
    images = generator.generate(list(range(count)), seeds=list(range(count)), top_k=0, **kwargs)
    return time.perf_counter() - start, images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small model and grid, fewer windows")
    parser.add_argument("--windows", type=int, nargs="*", default=None)
    parser.add_argument("--in-flight", type=int, default=None, help="images decoded together (default 16)")
    args = parser.parse_args(argv)

    from vllm_zipar.serving.offline import ImageGenerator

    if args.quick:
        name, shape, windows, in_flight = "small-16", SMALL_16, [8, 4], 4
    else:
        name, shape, windows, in_flight = "llamagen-b-24", LLAMAGEN_B_24, [16, 12, 8, 4], 16
    windows = args.windows or windows
    in_flight = args.in_flight or in_flight
    model_dir = random_model(name, shape)
    modes: list[tuple[str, int | None]] = [("NTP", None)] + [(f"ZipAR-{w}", w) for w in windows]

    rows = []
    with ImageGenerator(
        model_dir, max_num_seqs=max(in_flight, 1), kv_cache_memory_bytes=2 << 30
    ) as generator:
        timed_generate(generator, 1, None)  # warm-up: first-step allocations and kernel selection
        for label, window in modes:
            one_s, one = timed_generate(generator, 1, window)
            many_s, many = timed_generate(generator, in_flight, window)
            rows.append(
                {
                    "mode": label,
                    "window": window,
                    "passes_per_image": one[0].passes,
                    "seconds_per_image_1_in_flight": one_s,
                    f"images_per_second_{in_flight}_in_flight": in_flight / many_s,
                    "mean_cells_per_pass": sum(one[0].cells_per_pass) / len(one[0].cells_per_pass),
                }
            )
            print(
                f"[bench] {label:9s} passes {one[0].passes:4d}  {one_s:7.2f} s/image  "
                f"{in_flight / many_s:6.3f} images/s at {in_flight} in flight",
                flush=True,
            )

    ntp = rows[0]
    throughput_key = f"images_per_second_{in_flight}_in_flight"
    for row in rows:
        row["passes_ratio_ntp_over_this"] = ntp["passes_per_image"] / row["passes_per_image"]
        row["latency_ratio_ntp_over_this"] = (
            ntp["seconds_per_image_1_in_flight"] / row["seconds_per_image_1_in_flight"]
        )
        row["throughput_ratio_this_over_ntp"] = row[throughput_key] / ntp[throughput_key]

    print(f"\nmodel {name}, grid {shape['grid_size']}x{shape['grid_size']}, one engine, same weights")
    print(
        f"{'mode':10s} {'passes':>7s} {'s/image':>9s} {'NTP/this':>9s} {'pass ratio':>11s} "
        f"{'img/s@' + str(in_flight):>10s} {'this/NTP':>9s}"
    )
    for row in rows:
        print(
            f"{row['mode']:10s} {row['passes_per_image']:7d} {row['seconds_per_image_1_in_flight']:9.2f} "
            f"{row['latency_ratio_ntp_over_this']:9.2f} {row['passes_ratio_ntp_over_this']:11.2f} "
            f"{row[throughput_key]:10.3f} {row['throughput_ratio_this_over_ntp']:9.2f}"
        )

    suffix = "_quick" if args.quick else ""
    result = {"model": name, "shape": shape, "in_flight": in_flight, "machine": machine(), "rows": rows}
    json_path = write_json(f"zipar_vs_ntp{suffix}", result)
    names = [row["mode"] for row in rows]
    png = bar_plot(
        f"zipar_vs_ntp{suffix}",
        f"ZipAR vs NTP, {name}, same vLLM engine (CPU)",
        [
            ("forward passes per image", names, [row["passes_per_image"] for row in rows]),
            (
                "seconds per image (1 in flight)",
                names,
                [row["seconds_per_image_1_in_flight"] for row in rows],
            ),
            (f"images/s ({in_flight} in flight)", names, [row[throughput_key] for row in rows]),
        ],
    )
    print(f"\nwrote {json_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
