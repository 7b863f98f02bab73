"""Bounded load on `POST /v1/images/generations`: N concurrent clients, M requests, loopback only.

Starts `vllm serve MODEL --decoding zipar --zipar-window W` (our `vllm` command; default model: the shipped
digits model) unless `--url` names a running loopback server, then keeps `--clients` requests in flight
until `--requests` have completed. Prints p50/p99 latency and images/s, fails on any error, and writes
`benchmarks/results/serve_load[_quick].json` plus a PNG (latency histogram, latency over the run).

    python benchmarks/serve_load.py                 # 32 clients, 200 requests
    python benchmarks/serve_load.py --quick         # 4 clients, 8 requests (the test suite's smoke run)
    python benchmarks/serve_load.py --profile mixed --requests 300   # every third request is a bad one
    python benchmarks/serve_load.py --profile burst --clients 64 --requests 64 --n 10   # issue 22's burst
    python benchmarks/serve_load.py --profile burst --model emu3-reduced --tag emu3 \
        --clients 4 --requests 4 --n 4 --kv-cache-gib 2                             # the same on Emu3 90x90

The mixed profile cycles through bad requests (malformed JSON, out-of-range values, an oversized body, a
wrong content type, a wrong method) between good ones: each must get its own 4xx, the good ones 200, and no
request a 5xx.

The burst profile sends every other request with `"stream": true` (2 partial images), all at once, while a
probe reads `/health` and `/metrics` every PROBE_INTERVAL_S: it reports the probes' latencies (how
responsive the API server's event loop stays) and when streamed and JSON requests finish
(`serve_load_burst.json` / `.png`).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EMU3_REDUCED, RESULTS, machine, random_emu3, save_figure, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "digits"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


JSON = {"content-type": "application/json"}
ERROR_FIELDS = {"message", "type", "param", "code"}
# (method, headers, body, expected status): one of each kind of bad request the route refuses.
BAD_REQUESTS = [
    ("POST", JSON, b"{oops", 400),
    ("POST", JSON, b'{"prompt": "1", "temperature": 3}', 400),
    ("POST", JSON, b'{"prompt": "1", "zipar_window": 18446744073709551616}', 400),
    ("POST", JSON, b'{"prompt": "1", "cfg_scale": 1e308}', 400),
    ("POST", JSON, b'{"prompt": "1", "seed": -1}', 400),
    ("POST", JSON, b'{"prompt": "unicorn"}', 400),
    ("POST", JSON, b'{"prompt": "1", "n": 11}', 400),
    ("POST", JSON, b'{"prompt": "' + b"x" * (1 << 20) + b'"}', 413),
    ("POST", {"content-type": "text/plain"}, b'{"prompt": "1"}', 415),
    ("GET", {}, b"", 405),
    ("POST", JSON, b'{"prompt": "1", "model": "dall-e-3"}', 404),
]


PROBE_INTERVAL_S = 0.25
PROBE_PATHS = ("/health", "/metrics")


async def read_stream(http, body: dict, n: int) -> bool:
    """POST a streamed request and read its events; True when all `n` images completed."""
    import json

    completed = 0
    async with http.stream("POST", "/v1/images/generations", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return False
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                event = json.loads(line[len("data:") :])
                completed += event.get("type") == "image_generation.completed"
    return completed == n


def probe(url: str, ready: Any, stop: Any, results: Any) -> None:
    """Read each PROBE_PATHS every PROBE_INTERVAL_S until `stop` is set (`ready` once the first round is
    done); puts (sent at on `time.monotonic`'s clock, latency) per path on `results`. Runs in a process of
    its own, with its own connection: sharing the load's client, a probe waited for a free connection of its
    pool (the whole burst when every connection was busy), and the load's JSON parsing delayed its clock."""
    import httpx

    seen: dict[str, list[tuple[float, float]]] = {path: [] for path in PROBE_PATHS}
    with httpx.Client(base_url=url, timeout=600) as http:
        while not stop.is_set():
            for path in PROBE_PATHS:
                start = time.monotonic()
                try:
                    http.get(path)
                except httpx.HTTPError:
                    pass
                seen[path].append((start, time.monotonic() - start))
            ready.set()
            stop.wait(PROBE_INTERVAL_S)
    results.put(seen)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def display_path(path: str) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


async def run_load(
    url: str, clients: int, requests: int, num_classes: int | None, n: int, profile: str = "good"
) -> dict:
    import httpx

    latencies: list[float] = []
    finished_at: list[float] = []
    errors: list[str] = []
    statuses: dict[int, int] = {}
    good_latencies: list[float] = []
    good_finished: list[float] = []
    streamed: list[bool] = []
    next_request = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def client() -> None:
            nonlocal next_request
            while next_request < requests:
                i = next_request
                next_request += 1
                # A class-to-image model takes its class labels; a text-to-image one, any text.
                prompt = str(i % num_classes) if num_classes else f"a picture of the digit {i % 10}"
                body = {"prompt": prompt, "seed": i, "n": n}
                bad = (
                    BAD_REQUESTS[(i // 3) % len(BAD_REQUESTS)] if profile == "mixed" and i % 3 == 2 else None
                )
                start = time.perf_counter()
                try:
                    stream = profile == "burst" and i % 2 == 1
                    if stream:
                        ok = await read_stream(http, {**body, "stream": True, "partial_images": 2}, n)
                        statuses[200 if ok else 0] = statuses.get(200 if ok else 0, 0) + 1
                        if not ok:
                            errors.append(f"request {i}: the stream did not complete {n} images")
                    elif bad is None:
                        response = await http.post("/v1/images/generations", json=body)
                        ok = response.status_code == 200 and len(response.json()["data"]) == n
                    else:
                        method, headers, content, expected = bad
                        response = await http.request(
                            method, "/v1/images/generations", content=content, headers=headers
                        )
                        error = response.json().get("error", {})
                        ok = response.status_code == expected and set(error) == ERROR_FIELDS
                    if not stream:
                        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                        if not ok:
                            errors.append(f"request {i}: HTTP {response.status_code} {response.text[:200]}")
                except httpx.HTTPError as err:
                    errors.append(f"request {i}: {type(err).__name__}: {err}")
                now = time.perf_counter()
                latencies.append(now - start)
                finished_at.append(now)
                if bad is None:
                    good_latencies.append(now - start)
                    good_finished.append(now)
                    streamed.append(profile == "burst" and i % 2 == 1)

        context = multiprocessing.get_context("spawn")
        ready, stop, results = context.Event(), context.Event(), context.Queue()
        prober = None
        if profile == "burst":  # probing from the burst's first instant on
            prober = context.Process(target=probe, args=(url, ready, stop, results), daemon=True)
            prober.start()
            ready.wait(120)
        begin, begin_monotonic = time.perf_counter(), time.monotonic()  # the same clock on Linux
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - begin
        stop.set()
        probes = {}
        if prober is not None:
            seen = results.get(timeout=660)
            prober.join()
            probes = {
                path: [(sent - begin_monotonic, wait) for sent, wait in rounds if sent >= begin_monotonic]
                for path, rounds in seen.items()
            }
    return {
        "statuses": statuses,
        "good_latencies_s": good_latencies,
        "good_finished_at_s": [t - begin for t in good_finished],
        "latencies_s": latencies,
        "finished_at_s": [t - begin for t in finished_at],
        "errors": errors,
        "wall_s": wall,
        "streamed": streamed,
        "probes": probes,
    }


def plot(name: str, title: str, latencies: list[float], finished_at: list[float]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.hist(latencies, bins=30, color="#2a7fbf")
    for q, style in ((50, "--"), (99, ":")):
        left.axvline(percentile(latencies, q), color="black", linestyle=style, label=f"p{q}")
    left.set_xlabel("latency per request (s)")
    left.set_ylabel("requests")
    left.legend(fontsize=8)
    right.plot(finished_at, latencies, ".", color="#2a7fbf", markersize=4)
    right.set_xlabel("completed at (s since start)")
    right.set_ylabel("latency (s)")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, name)


def burst_summary(result: dict) -> dict:
    """Probe latencies per path and the finish latencies of streamed vs JSON requests."""
    summary: dict = {}
    for path, seen in result["probes"].items():
        waits = [latency for _, latency in seen] or [0.0]
        summary[path] = {
            "probes": len(seen),
            "p50_ms": round(1000 * percentile(waits, 50), 1),
            "p99_ms": round(1000 * percentile(waits, 99), 1),
            "max_ms": round(1000 * max(waits), 1),
        }
    for kind, flag in (("streamed", True), ("json", False)):
        mine = [t for t, s in zip(result["good_latencies_s"], result["streamed"], strict=True) if s == flag]
        if mine:
            summary[kind] = {
                "requests": len(mine),
                "mean_s": round(statistics.fmean(mine), 3),
                "p50_s": round(percentile(mine, 50), 3),
                "p99_s": round(percentile(mine, 99), 3),
            }
    if "streamed" in summary and "json" in summary:
        summary["streamed_over_json_mean"] = round(
            summary["streamed"]["mean_s"] / summary["json"]["mean_s"], 3
        )
    return summary


def plot_burst(name: str, title: str, result: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for (path, seen), colour in zip(result["probes"].items(), ("#2a7fbf", "#d9822b"), strict=False):
        left.plot(
            [t for t, _ in seen], [1000 * w for _, w in seen], ".", color=colour, markersize=3, label=path
        )
    left.set_xlabel("sent at (s since the burst began)")
    left.set_ylabel("probe latency (ms)")
    left.set_yscale("log")
    left.legend(fontsize=8)
    for flag, colour, label in ((False, "#2a7fbf", "JSON"), (True, "#d9822b", "streamed")):
        points = [
            (done, latency)
            for done, latency, s in zip(
                result["good_finished_at_s"], result["good_latencies_s"], result["streamed"], strict=True
            )
            if s == flag
        ]
        right.plot(
            [d for d, _ in points], [w for _, w in points], ".", color=colour, markersize=4, label=label
        )
    right.set_xlabel("completed at (s since start)")
    right.set_ylabel("request latency (s)")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 clients, 8 requests")
    parser.add_argument(
        "--profile",
        choices=["good", "mixed", "burst"],
        default="good",
        help="mixed: every third request is bad; burst: every other one streams, /health and /metrics probed",
    )
    parser.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        help="model directory to serve, or emu3-reduced (random weights, 90x90 grid, written once)",
    )
    parser.add_argument("--url", default=None, help="a running loopback server instead of starting one")
    parser.add_argument("--clients", type=int, default=None, help="requests in flight (default 32)")
    parser.add_argument("--requests", type=int, default=None, help="requests in all (default 200)")
    parser.add_argument("--n", type=int, default=1, help="images per request")
    parser.add_argument("--window", type=int, default=8, help="server's ZipAR window")
    parser.add_argument("--kv-cache-gib", type=float, default=0.25, help="server's KV cache (GiB)")
    parser.add_argument("--tag", default=None, help="suffix of the result files' names (another model)")
    args = parser.parse_args()
    clients = args.clients or (4 if args.quick else 32)
    requests = args.requests or (8 if args.quick else 200)
    name = "serve_load_quick" if args.quick else "serve_load"
    if args.profile != "good":
        name += f"_{args.profile}"
    if args.tag:
        name += f"_{args.tag}"

    from vllm_zipar.models.registry import load_image_model
    from vllm_zipar.serving.served_model import ServedModel

    if args.model == "emu3-reduced":
        args.model = str(random_emu3("emu3-reduced-90", EMU3_REDUCED))
    image_model = load_image_model(args.model)
    num_classes = image_model.num_classes
    cfg_scale = image_model.sampling_defaults.cfg_scale  # requests take the model's sampling defaults
    server = None
    url = args.url
    if url is None:
        log = RESULTS / f"{name}_server.log"
        RESULTS.mkdir(parents=True, exist_ok=True)
        extra = ["--kv-cache-memory-bytes", str(int(args.kv_cache_gib * (1 << 30))), "--max-num-seqs", "64"]
        print(f"[serve_load] starting vllm serve {args.model} --decoding zipar --zipar-window {args.window}")
        server = ServedModel(args.model, zipar_window=args.window, extra_args=extra, log_path=log)
        start = time.perf_counter()
        server.start()
        print(f"[serve_load] server up in {time.perf_counter() - start:.1f} s at {server.url} (log: {log})")
        url = server.url
    elif urlparse(url).hostname not in LOOPBACK:
        parser.error(f"--url must be a loopback address ({', '.join(LOOPBACK)}), got {url}")
    try:
        result = asyncio.run(run_load(url, clients, requests, num_classes, args.n, args.profile))
        kv_usage = server.idle_kv_usage(timeout=15.0) if server is not None else None
    finally:
        if server is not None:
            server.stop()
    if server is not None and not result["errors"]:
        log.unlink(missing_ok=True)  # kept when a request failed

    latencies = result["good_latencies_s"]
    images_per_s = len(latencies) * args.n / result["wall_s"]
    summary = {
        "model": display_path(args.model),
        "window": args.window,
        "cfg_scale": cfg_scale,
        "clients": clients,
        "requests": requests,
        "profile": args.profile,
        "bad_requests": requests - len(latencies),
        "statuses": {str(code): count for code, count in sorted(result["statuses"].items())},
        "server_errors_5xx": sum(c for code, c in result["statuses"].items() if code >= 500),
        "images_per_request": args.n,
        "errors": len(result["errors"]),
        "wall_s": round(result["wall_s"], 3),
        "p50_s": round(percentile(latencies, 50), 4),
        "p99_s": round(percentile(latencies, 99), 4),
        "mean_s": round(statistics.fmean(latencies), 4),
        "images_per_s": round(images_per_s, 3),
        "kv_cache_usage_after": kv_usage,
        "machine": machine(),
    }
    if args.profile == "burst":
        summary["burst"] = burst_summary(result)
    path = write_json(name, {**summary, "latencies_s": [round(t, 4) for t in latencies]})
    good = (
        f"{requests} requests"
        if args.profile == "good"
        else f"{len(latencies)} good + {requests - len(latencies)} bad"
    )
    title = (
        f"POST /v1/images/generations: {clients} clients, {good}, ZipAR-{args.window}, "
        f"CFG {cfg_scale:g}\n"
        f"p50 {summary['p50_s']:.2f} s, p99 {summary['p99_s']:.2f} s, {images_per_s:.2f} images/s"
    )
    png = (
        plot_burst(name, title, result)
        if args.profile == "burst"
        else plot(name, title, latencies, result["good_finished_at_s"])
    )
    print(
        f"[serve_load] {requests} requests ({summary['bad_requests']} bad), {clients} clients: "
        f"errors {summary['errors']}, 5xx {summary['server_errors_5xx']}, statuses {summary['statuses']}, "
        f"p50 {summary['p50_s']:.3f} s, p99 {summary['p99_s']:.3f} s, {images_per_s:.3f} images/s, "
        f"wall {summary['wall_s']:.1f} s"
    )
    if args.profile == "burst":
        print(f"[serve_load] burst: {summary['burst']}")
    print(f"[serve_load] wrote {path} and {png}")
    for error in result["errors"][:5]:
        print(f"[serve_load] error: {error}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
