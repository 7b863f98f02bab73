"""Pipeline parallel over Ray against pipeline parallel over `mp`: seconds per image, measured in one run.

Both engines decode the same requests with PP=2 on this host's two cores: `mp` with its worker processes
bound to core 0 and core 1 (`VLLM_CPU_OMP_THREADS_BIND="0|1"`, as vLLM does for `mp`), and Ray on the
two-node loopback cluster of the tests (`tests/parallel/ray_cluster.py`: `ray start` on 127.0.0.2 and
127.0.0.3, one CPU each, one stage per node; that is the layout docs/multinode.md recommends, pipeline stages
across nodes). Both engines stay up for the whole run and their timed requests alternate, so both see the
same load on a shared machine; each point is the median of the rounds. The tokens of both engines must be
equal (the same weights, requests and seeds); each worker's niceness, torch threads and CPU affinity are
recorded. Prints the Ray/mp ratio per decoding; writes benchmarks/results/pp_ray_vs_mp.json and .png.

    python benchmarks/pp_ray_vs_mp.py [--quick] [--rounds N] [--node-env KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT.parent))  # tests.parallel.ray_cluster

from common import SMALL_16, bar_plot, machine, random_model, write_json  # noqa: E402

KV_CACHE_BYTES = 64 << 20
IMAGES = 2  # in flight together, per timed request
DECODINGS = {"NTP": {"decoding": "ntp"}, "ZipAR-4": {"zipar_window": 4}}
# vLLM's shared-memory queue readers spin for 1 s after their last read before they sleep: the idle engine
# must be asleep before the other one is timed.
SETTLE_S = 1.5


def worker_state(_worker=None) -> dict:
    """Run inside each worker (collective_rpc): what the OS and torch give its compute thread."""
    import os

    import torch

    return {
        "pid": os.getpid(),
        "niceness": os.getpriority(os.PRIO_PROCESS, 0),
        "torch_threads": torch.get_num_threads(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def timed(generator, mode: str) -> tuple[float, list]:
    time.sleep(SETTLE_S)
    start = time.perf_counter()
    images = generator.generate([1] * IMAGES, seeds=list(range(IMAGES)), **DECODINGS[mode])
    return (time.perf_counter() - start) / IMAGES, [image.tokens for image in images]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one timed round (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per engine (default 5)")
    parser.add_argument(
        "--node-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of both `ray start` processes (e.g. RAY_worker_niceness=0)",
    )
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        help="busy-looping processes at normal priority during the timed rounds (other work on the host)",
    )
    parser.add_argument("--name", default=None, help="results file name (default pp_ray_vs_mp[_quick])")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    name = args.name or ("pp_ray_vs_mp_quick" if args.quick else "pp_ray_vs_mp")
    node_env = dict(item.split("=", 1) for item in args.node_env)

    import ray
    import torch

    from tests.parallel.ray_cluster import LocalRayCluster
    from vllm_zipar.serving.offline import ImageGenerator

    model_dir = random_model("llamagen_small_16", SMALL_16)
    engine_kwargs = dict(pipeline_parallel_size=2, max_num_seqs=16, kv_cache_memory_bytes=KV_CACHE_BYTES)
    load_before = os.getloadavg()
    with LocalRayCluster(node_env=node_env) as cluster:
        # The bind list is for the mp engine only: Ray carries the driver's VLLM_* variables to its actors.
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
        try:
            engines = {"mp": ImageGenerator(model_dir, distributed_executor_backend="mp", **engine_kwargs)}
        finally:
            del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            engines["ray"] = ImageGenerator(model_dir, distributed_executor_backend="ray", **engine_kwargs)
            workers = {key: engine.llm.collective_rpc(worker_state) for key, engine in engines.items()}
            for key, states in workers.items():
                print(f"[bench] {key} workers: {states}", flush=True)
            for engine in engines.values():  # warm-up: first steps, kernel builds
                for mode in DECODINGS:
                    timed(engine, mode)
            seconds: dict[str, dict[str, list[float]]] = {key: {m: [] for m in DECODINGS} for key in engines}
            tokens: dict[str, dict[str, list]] = {key: {} for key in engines}
            busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
            try:
                for round_index in range(rounds):
                    order = ["mp", "ray"] if round_index % 2 == 0 else ["ray", "mp"]
                    for mode in DECODINGS:
                        for key in order:
                            s, grids = timed(engines[key], mode)
                            seconds[key][mode].append(s)
                            tokens[key][mode] = grids
                    print(
                        f"[bench] round {round_index + 1}/{rounds}: "
                        + "  ".join(f"{k} {m} {seconds[k][m][-1]:.3f}" for k in engines for m in DECODINGS),
                        flush=True,
                    )
            finally:
                for process in busy:
                    process.kill()
                    process.wait()
        finally:
            for engine in engines.values():
                engine.close()
            ray.shutdown()
    load_after = os.getloadavg()

    exact = all(
        all(torch.equal(a, b) for a, b in zip(tokens["mp"][m], tokens["ray"][m], strict=True))
        for m in DECODINGS
    )
    rows = []
    for mode in DECODINGS:
        mp_s = statistics.median(seconds["mp"][mode])
        ray_s = statistics.median(seconds["ray"][mode])
        rows.append(
            {
                "mode": mode,
                "mp_seconds_per_image": mp_s,
                "ray_seconds_per_image": ray_s,
                "ray_over_mp": ray_s / mp_s,
                "mp_samples": seconds["mp"][mode],
                "ray_samples": seconds["ray"][mode],
            }
        )
        print(
            f"[bench] {mode:8s} mp {mp_s:.3f} s/image  ray {ray_s:.3f} s/image  ray/mp {ray_s / mp_s:.2f}x",
            flush=True,
        )
    print(f"[bench] tokens equal across mp and ray: {exact}", flush=True)
    print(f"[bench] load average before {load_before}, after {load_after}", flush=True)
    result = {
        "model": "llamagen_small_16 (random weights, 4 layers, 16x16 grid)",
        "layout": "PP=2; mp: two workers bound to cores 0 and 1; ray: two loopback nodes, 1 CPU each",
        "images_per_request": IMAGES,
        "rounds": rounds,
        "node_env": node_env,
        "busy_processes": args.busy,
        "workers": workers,
        "tokens_equal": exact,
        "rows": rows,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "machine": machine(),
    }
    path = write_json(name, result)
    bar_plot(
        name,
        "PP=2 seconds per image (median of rounds): mp vs Ray",
        [
            (
                f"{row['mode']}: ray/mp {row['ray_over_mp']:.2f}x",
                ["mp", "ray"],
                [row["mp_seconds_per_image"], row["ray_seconds_per_image"]],
            )
            for row in rows
        ],
    )
    print(f"[bench] wrote {path}", flush=True)
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
