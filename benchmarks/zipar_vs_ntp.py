"""ZipAR vs NTP in the same vLLM engine, same weights: passes, seconds per image, images per second.

    python benchmarks/zipar_vs_ntp.py            # LlamaGen-B shape, 24x24 grid, windows 16/12/8/4
    python benchmarks/zipar_vs_ntp.py --quick    # small model, 16x16 grid: a smoke run of a minute or two
    python benchmarks/zipar_vs_ntp.py --emu3     # the Emu3 section: text prompt, 90x90 grid with EOLs
                                                 # (zipar_vs_ntp_emu3.py; add --quick for a 16x16 smoke run)
    python benchmarks/zipar_vs_ntp.py --janus    # the Janus-Pro section: text prompt, 24x24 grid, CFG 5
                                                 # (zipar_vs_ntp_janus.py; add --quick for an 8x8 smoke run)
    python benchmarks/zipar_vs_ntp.py --lumina   # the Lumina-mGPT section: text prompt, 48x48 + EOL, CFG 4
                                                 # (zipar_vs_ntp_lumina.py; add --quick for an 8x8 smoke run)

Without guidance (cfg 1) every window runs; with classifier-free guidance (`--cfg-scale`, default 2.0) NTP
and `--cfg-windows` (default 8 and 4) run, each guided image being one request holding both sequences. A
guided NTP image in our engine takes the masked attention path (its two streams share one KV sequence), so
the CFG section also times "NTP pair": two unguided NTP images per guided one, the cost of guidance with
vLLM's stock kernel and two plain requests. ZipAR's CFG ratios are quoted against the faster of the two.
Ratios are measured in one run on one engine. Writes benchmarks/results/zipar_vs_ntp[_quick].json and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LLAMAGEN_B_24, SMALL_16, bar_plot, machine, random_model, write_json  # noqa: E402


def timed_generate(generator, count: int, window: int | None, cfg_scale: float = 1.0) -> tuple[float, list]:
    kwargs = {"decoding": "ntp"} if window is None else {"zipar_window": window}
    labels = list(range(count))
    start = time.perf_counter()
    images = generator.generate(labels, seeds=labels, top_k=0, cfg_scale=cfg_scale, **kwargs)
    return time.perf_counter() - start, images


def measure(generator, label: str, window: int | None, cfg_scale: float, in_flight: int, per_image: int = 1):
    """One row: 1 image in flight, then `in_flight` images; `per_image` requests make one image."""
    one_s, one = timed_generate(generator, per_image, window, cfg_scale)
    many_s, _ = timed_generate(generator, in_flight * per_image, window, cfg_scale)
    row = {
        "mode": label,
        "window": window,
        "cfg_scale": cfg_scale,
        "requests_per_image": per_image,
        "passes_per_image": one[0].passes,
        "seconds_per_image_1_in_flight": one_s,
        f"images_per_second_{in_flight}_in_flight": in_flight / many_s,
        "mean_cells_per_pass": sum(one[0].cells_per_pass) / len(one[0].cells_per_pass),
    }
    print(
        f"[bench] {label:14s} cfg {cfg_scale:3.1f} passes {one[0].passes:4d}  {one_s:7.2f} s/image  "
        f"{in_flight / many_s:6.3f} images/s at {in_flight} in flight",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--emu3" in argv:
        from zipar_vs_ntp_emu3 import main as emu3_main

        return emu3_main([arg for arg in argv if arg != "--emu3"])
    if "--janus" in argv:
        from zipar_vs_ntp_janus import main as janus_main

        return janus_main([arg for arg in argv if arg != "--janus"])
    if "--lumina" in argv:
        from zipar_vs_ntp_lumina import main as lumina_main

        return lumina_main([arg for arg in argv if arg != "--lumina"])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small model and grid, fewer windows")
    parser.add_argument("--windows", type=int, nargs="*", default=None)
    parser.add_argument("--in-flight", type=int, default=None, help="images decoded together (default 16)")
    parser.add_argument("--cfg-scale", type=float, default=2.0, help="guidance scale of the CFG section")
    parser.add_argument("--cfg-windows", type=int, nargs="*", default=None, help="ZipAR windows with CFG")
    args = parser.parse_args(argv)

    from vllm_zipar.serving.offline import ImageGenerator

    if args.quick:
        name, shape, windows, in_flight, cfg_windows = "small-16", SMALL_16, [8, 4], 4, [4]
    else:
        name, shape, windows, in_flight, cfg_windows = (
            "llamagen-b-24",
            LLAMAGEN_B_24,
            [16, 12, 8, 4],
            16,
            [8, 4],
        )
    windows = args.windows or windows
    cfg_windows = args.cfg_windows if args.cfg_windows is not None else cfg_windows
    in_flight = args.in_flight or in_flight
    model_dir = random_model(name, shape)

    rows, cfg_rows = [], []
    with ImageGenerator(
        model_dir, max_num_seqs=max(2 * in_flight, 1), kv_cache_memory_bytes=2 << 30
    ) as generator:
        timed_generate(generator, 1, None)  # warm-up: first-step allocations and kernel selection
        rows.append(measure(generator, "NTP", None, 1.0, in_flight))
        rows += [measure(generator, f"ZipAR-{w}", w, 1.0, in_flight) for w in windows]
        if args.cfg_scale != 1.0:
            cfg_rows.append(measure(generator, "NTP pair", None, 1.0, in_flight, per_image=2))
            cfg_rows.append(measure(generator, "NTP", None, args.cfg_scale, in_flight))
            cfg_rows += [measure(generator, f"ZipAR-{w}", w, args.cfg_scale, in_flight) for w in cfg_windows]

    throughput_key = f"images_per_second_{in_flight}_in_flight"
    for section in (rows, cfg_rows):
        if not section:
            continue
        baselines = [row for row in section if row["window"] is None]
        fastest = min(row["seconds_per_image_1_in_flight"] for row in baselines)
        busiest = max(row[throughput_key] for row in baselines)
        passes = baselines[0]["passes_per_image"]
        for row in section:
            row["passes_ratio_ntp_over_this"] = passes / row["passes_per_image"]
            row["latency_ratio_ntp_over_this"] = fastest / row["seconds_per_image_1_in_flight"]
            row["throughput_ratio_this_over_ntp"] = row[throughput_key] / busiest

    print(f"\nmodel {name}, grid {shape['grid_size']}x{shape['grid_size']}, one engine, same weights")
    print("ratios against the fastest NTP baseline of the same section (NTP, or NTP pair with CFG)")
    print(
        f"{'mode':10s} {'cfg':>4s} {'passes':>7s} {'s/image':>9s} {'NTP/this':>9s} {'pass ratio':>11s} "
        f"{'img/s@' + str(in_flight):>10s} {'this/NTP':>9s}"
    )
    for row in rows + cfg_rows:
        print(
            f"{row['mode']:10s} {row['cfg_scale']:4.1f} {row['passes_per_image']:7d} "
            f"{row['seconds_per_image_1_in_flight']:9.2f} {row['latency_ratio_ntp_over_this']:9.2f} "
            f"{row['passes_ratio_ntp_over_this']:11.2f} {row[throughput_key]:10.3f} "
            f"{row['throughput_ratio_this_over_ntp']:9.2f}"
        )

    suffix = "_quick" if args.quick else ""
    result = {
        "model": name,
        "shape": shape,
        "in_flight": in_flight,
        "machine": machine(),
        "rows": rows,
        "cfg_rows": cfg_rows,
    }
    json_path = write_json(f"zipar_vs_ntp{suffix}", result)
    names = [
        f"{row['mode']}" + (f"\ncfg {row['cfg_scale']:g}" if row["cfg_scale"] != 1.0 else "")
        for row in rows + cfg_rows
    ]
    everything = rows + cfg_rows
    png = bar_plot(
        f"zipar_vs_ntp{suffix}",
        f"ZipAR vs NTP, {name}, same vLLM engine (CPU)",
        [
            ("forward passes per image", names, [row["passes_per_image"] for row in everything]),
            (
                "seconds per image (1 in flight)",
                names,
                [row["seconds_per_image_1_in_flight"] for row in everything],
            ),
            (f"images/s ({in_flight} in flight)", names, [row[throughput_key] for row in everything]),
        ],
    )
    print(f"\nwrote {json_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
