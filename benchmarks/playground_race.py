"""The playground's race through the HTTP API, as the page runs it: does the wall time show ZipAR's speed-up?

Starts `vllm serve models/digits --decoding zipar` (or uses `--url`, a running loopback server) and sends,
alternated over `--repeats` rounds, the same class prompt and seed as:
- **alone, 0 frames**: one streamed request at a time, NTP then ZipAR-W, no partial images: the engine's
  ratio through the API (NTP seconds / ZipAR seconds);
- **alone, F frames**: the same with `partial_frames` F;
- **race, 0 frames**: NTP and ZipAR-W sent together (both streamed), no partial images;
- **race, F frames**: what the playground's race posts (two concurrent streamed requests, `partial_frames`
  F, model's default guidance).
Each side's time runs from sending its request to its `image_generation.completed` event. Prints each
condition's median NTP/ZipAR ratio and the race's ratio as a fraction of the engine's, and writes
`benchmarks/results/playground_race.json` plus a PNG (the ratios; one race round's event timeline).

    python benchmarks/playground_race.py               # 8 rounds, 16 frames, window 4 (~3 minutes)
    python benchmarks/playground_race.py --quick       # 2 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, save_figure, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "digits"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ROUTE = "/v1/images/generations"


async def stream_one(http, body: dict) -> dict:
    """POST one streamed request, read its events: seconds to the completed event, and each event's
    arrival (seconds since sent, kind, passes)."""
    start = time.perf_counter()
    events: list[tuple[float, str, int | None]] = []
    async with http.stream("POST", ROUTE, json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[len("data:") :])
            if "error" in event:
                raise SystemExit(f"stream error: {event['error']}")
            kind = "final" if event.get("type") == "image_generation.completed" else "partial"
            passes = event.get("zipar", {}).get("passes")
            events.append((time.perf_counter() - start, kind, passes))
            if kind == "final":
                break
    return {"seconds": events[-1][0], "events": events}


def body_for(decoding: str, window: int, frames: int, prompt: str, seed: int) -> dict:
    """The page's request body (playground.js `requestBody`) with the model's default guidance."""
    body = {"prompt": prompt, "n": 1, "stream": True, "seed": seed, "decoding": decoding}
    if frames > 0:
        body["partial_frames"] = frames
    if decoding == "zipar":
        body["zipar_window"] = window
    return body


async def run_rounds(url: str, window: int, frames: int, repeats: int, prompt: str, seed: int) -> dict:
    import httpx

    conditions: dict[str, dict[str, list]] = {
        f"{mode}_{f}": {"ntp": [], "zipar": [], "events": []}
        for mode in ("alone", "race")
        for f in (0, frames)
    }
    async with httpx.AsyncClient(base_url=url, timeout=300.0) as http:
        # Warm-up: the pixel thread's decoder, the engine's first steps of each kind.
        for decoding in ("ntp", "zipar"):
            await stream_one(http, body_for(decoding, window, frames, prompt, seed))
        for round_ in range(repeats):
            order = [0, frames] if round_ % 2 == 0 else [frames, 0]
            for f in order:
                sides = ("ntp", "zipar") if round_ % 2 == 0 else ("zipar", "ntp")
                alone = conditions[f"alone_{f}"]
                for side in sides:
                    result = await stream_one(http, body_for(side, window, f, prompt, seed))
                    alone[side].append(result["seconds"])
                race = conditions[f"race_{f}"]
                ntp, zipar = await asyncio.gather(
                    stream_one(http, body_for("ntp", window, f, prompt, seed)),
                    stream_one(http, body_for("zipar", window, f, prompt, seed)),
                )
                race["ntp"].append(ntp["seconds"])
                race["zipar"].append(zipar["seconds"])
                race["events"].append({"ntp": ntp["events"], "zipar": zipar["events"]})
            line = "  ".join(
                f"{name} {c['ntp'][-1]:.2f}/{c['zipar'][-1]:.2f}s" for name, c in conditions.items()
            )
            print(f"[race] round {round_ + 1}/{repeats}: (NTP/ZipAR) {line}", flush=True)
    return conditions


def summarize(conditions: dict) -> dict:
    summary = {}
    for name, c in conditions.items():
        ratios = [n / z for n, z in zip(c["ntp"], c["zipar"], strict=True)]
        summary[name] = {
            "ntp_s": [round(s, 3) for s in c["ntp"]],
            "zipar_s": [round(s, 3) for s in c["zipar"]],
            "ntp_median_s": round(statistics.median(c["ntp"]), 3),
            "zipar_median_s": round(statistics.median(c["zipar"]), 3),
            "ratios": [round(r, 3) for r in ratios],
            "median_ratio": round(statistics.median(ratios), 3),
        }
    return summary


def plot(name: str, summary: dict, conditions: dict, frames: int, window: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = list(summary)
    ratios = [summary[n]["median_ratio"] for n in names]
    bars = left.bar(names, ratios, color=["#888888", "#888888", "#2a7fbf", "#2a7fbf"][: len(names)])
    left.bar_label(bars, fmt="%.2f", fontsize=8)
    for i, n in enumerate(names):
        left.scatter([i] * len(summary[n]["ratios"]), summary[n]["ratios"], color="black", s=8, zorder=3)
    left.set_ylabel(f"NTP s / ZipAR-{window} s (median of rounds)")
    left.set_title("wall-time ratio, send to completed event", fontsize=10)
    left.tick_params(axis="x", labelsize=8)
    events = conditions[f"race_{frames}"]["events"]
    one = events[len(events) // 2]
    for row, side in enumerate(("ntp", "zipar")):
        times = [t for t, _, _ in one[side]]
        right.scatter(times, [row] * len(times), s=14, marker="|", color="black")
        right.scatter(times[-1:], [row], s=40, color="#2a7fbf")
    right.set_yticks([0, 1], ["NTP", f"ZipAR-{window}"])
    right.set_xlabel("event arrival (s since sent); dot: completed")
    right.set_title(f"one race round, {frames} frames", fontsize=10)
    fig.suptitle("playground race through the API (models/digits)", fontsize=11)
    return save_figure(fig, name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 8)")
    parser.add_argument("--frames", type=int, default=16, help="partial_frames of the streamed conditions")
    parser.add_argument("--window", type=int, default=4, help="ZipAR window of the ZipAR side")
    parser.add_argument("--prompt", default="3")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory to serve")
    parser.add_argument("--url", default=None, help="a running loopback server instead of starting one")
    parser.add_argument("--name", default=None, help="results file name (default playground_race[_quick])")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 8)
    name = args.name or ("playground_race_quick" if args.quick else "playground_race")

    from vllm_zipar.serving.served_model import ServedModel

    server = None
    url = args.url
    if url is None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        log = RESULTS / f"{name}_server.log"
        # The playground test's server (tests/serving/conftest.py SERVER_ARGS).
        extra = ["--kv-cache-memory-bytes", str(64 << 20), "--max-num-seqs", "16"]
        server = ServedModel(args.model, zipar_window=8, extra_args=extra, log_path=log)
        start = time.perf_counter()
        server.start()
        print(f"[race] server up in {time.perf_counter() - start:.1f} s at {server.url}", flush=True)
        url = server.url
    elif urlparse(url).hostname not in LOOPBACK:
        parser.error(f"--url must be a loopback address ({', '.join(LOOPBACK)}), got {url}")
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    try:
        conditions = asyncio.run(run_rounds(url, args.window, args.frames, repeats, args.prompt, args.seed))
    finally:
        if server is not None:
            server.stop()
    if server is not None:
        log.unlink(missing_ok=True)
    load_after = Path("/proc/loadavg").read_text().split()[:3]

    summary = summarize(conditions)
    engine = summary["alone_0"]["median_ratio"]
    race = summary[f"race_{args.frames}"]["median_ratio"]
    for cond, row in summary.items():
        print(
            f"[race] {cond:9s} NTP {row['ntp_median_s']:6.2f} s  ZipAR-{args.window} "
            f"{row['zipar_median_s']:6.2f} s  ratio {row['median_ratio']:5.2f}  (rounds: {row['ratios']})"
        )
    print(f"[race] race ratio / engine ratio = {race:.2f} / {engine:.2f} = {race / engine:.2f}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    result = {
        "model": "models/digits",
        "window": args.window,
        "frames": args.frames,
        "prompt": args.prompt,
        "seed": args.seed,
        "repeats": repeats,
        "conditions": summary,
        "engine_ratio": engine,
        "race_ratio": race,
        "race_over_engine": round(race / engine, 3),
        "race_timeline": conditions[f"race_{args.frames}"]["events"][repeats // 2],
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "commit": commit.stdout.strip(),
        "machine": machine(),
    }
    figure = plot(name, summary, conditions, args.frames, args.window)
    print(f"[race] wrote {write_json(name, result)} and {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
