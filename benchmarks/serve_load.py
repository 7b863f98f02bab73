"""Bounded load on `POST /v1/images/generations`: N concurrent clients, M requests, loopback only.

Starts `vllm serve MODEL --decoding zipar --zipar-window W` (our `vllm` command; default model: the shipped
digits model) unless `--url` names a running loopback server, then keeps `--clients` requests in flight
until `--requests` have completed. Prints p50/p99 latency and images/s, fails on any error, and writes
`benchmarks/results/serve_load[_quick].json` plus a PNG (latency histogram, latency over the run).

    python benchmarks/serve_load.py                 # 32 clients, 200 requests
    python benchmarks/serve_load.py --quick         # 4 clients, 8 requests (the test suite's smoke run)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, save_figure, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "digits"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def display_path(path: str) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


async def run_load(url: str, clients: int, requests: int, num_classes: int, n: int) -> dict:
    import httpx

    latencies: list[float] = []
    finished_at: list[float] = []
    errors: list[str] = []
    next_request = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def client() -> None:
            nonlocal next_request
            while next_request < requests:
                i = next_request
                next_request += 1
                body = {"prompt": str(i % num_classes), "seed": i, "n": n}
                start = time.perf_counter()
                try:
                    response = await http.post("/v1/images/generations", json=body)
                    if response.status_code != 200 or len(response.json()["data"]) != n:
                        errors.append(f"request {i}: HTTP {response.status_code} {response.text[:200]}")
                except httpx.HTTPError as err:
                    errors.append(f"request {i}: {type(err).__name__}: {err}")
                now = time.perf_counter()
                latencies.append(now - start)
                finished_at.append(now)

        begin = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - begin
    return {
        "latencies_s": latencies,
        "finished_at_s": [t - begin for t in finished_at],
        "errors": errors,
        "wall_s": wall,
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 clients, 8 requests")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory to serve")
    parser.add_argument("--url", default=None, help="a running loopback server instead of starting one")
    parser.add_argument("--clients", type=int, default=None, help="requests in flight (default 32)")
    parser.add_argument("--requests", type=int, default=None, help="requests in all (default 200)")
    parser.add_argument("--n", type=int, default=1, help="images per request")
    parser.add_argument("--window", type=int, default=8, help="server's ZipAR window")
    parser.add_argument("--kv-cache-gib", type=float, default=0.25, help="server's KV cache (GiB)")
    args = parser.parse_args()
    clients = args.clients or (4 if args.quick else 32)
    requests = args.requests or (8 if args.quick else 200)
    name = "serve_load_quick" if args.quick else "serve_load"

    from vllm_zipar.models.model_dir import load_config
    from vllm_zipar.serving.launch import ServedModel

    model_config = load_config(args.model)
    num_classes = model_config.num_classes
    cfg_scale = model_config.sampling_defaults["cfg_scale"]  # requests take the model's sampling defaults
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
        result = asyncio.run(run_load(url, clients, requests, num_classes, args.n))
        kv_usage = server.idle_kv_usage(timeout=15.0) if server is not None else None
    finally:
        if server is not None:
            server.stop()
    if server is not None and not result["errors"]:
        log.unlink(missing_ok=True)  # kept when a request failed

    latencies = result["latencies_s"]
    images_per_s = requests * args.n / result["wall_s"]
    summary = {
        "model": display_path(args.model),
        "window": args.window,
        "cfg_scale": cfg_scale,
        "clients": clients,
        "requests": requests,
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
    path = write_json(name, {**summary, "latencies_s": [round(t, 4) for t in latencies]})
    title = (
        f"POST /v1/images/generations: {clients} clients, {requests} requests, ZipAR-{args.window}, "
        f"CFG {cfg_scale:g}\n"
        f"p50 {summary['p50_s']:.2f} s, p99 {summary['p99_s']:.2f} s, {images_per_s:.2f} images/s"
    )
    png = plot(name, title, latencies, result["finished_at_s"])
    print(
        f"[serve_load] {requests} requests, {clients} clients: errors {summary['errors']}, "
        f"p50 {summary['p50_s']:.3f} s, p99 {summary['p99_s']:.3f} s, {images_per_s:.3f} images/s, "
        f"wall {summary['wall_s']:.1f} s"
    )
    print(f"[serve_load] wrote {path} and {png}")
    for error in result["errors"][:5]:
        print(f"[serve_load] error: {error}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
