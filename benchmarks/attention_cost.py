"""What a ZipAR step costs next to a stock decode step, measured inside one vLLM engine.

For 1 and 2 images in flight, times engine steps at a context of ~250-350 tokens: NTP steps (k = 1 token
per request, vLLM's own kernel) against ZipAR-8 steps with exactly k = 3 tokens per request (three rows in
flight on a 24-wide grid, the masked path). Prints the ratio; writes benchmarks/results/attention_cost.json.

    python benchmarks/attention_cost.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LLAMAGEN_B_24, SMALL_16, machine, random_model, write_json  # noqa: E402


def step_times(
    generator, count: int, window: int | None, want_k: int, context: tuple[int, int]
) -> list[float]:
    """Durations of the engine steps in which every image fed exactly `want_k` tokens within `context`."""
    scheduler = generator.llm.llm_engine.engine_core.engine_core.scheduler
    kwargs = {"decoding": "ntp"} if window is None else {"zipar_window": window}
    for i in range(count):
        generator.add_request(f"cost-{window}-{i}", i, seed=i, top_k=0, cfg_scale=1.0, **kwargs)
    times = []
    while generator.has_unfinished_requests():
        states = list(scheduler.images.values())
        requests = [scheduler.requests[rid] for rid in scheduler.images]
        ks = [s.plan.num_fed - r.num_computed_tokens for s, r in zip(states, requests, strict=True)]
        contexts = [s.plan.num_fed for s in states]
        start = time.perf_counter()
        generator.step()
        elapsed = time.perf_counter() - start
        if (
            len(ks) == count
            and all(k == want_k for k in ks)
            and all(context[0] <= c <= context[1] for c in contexts)
        ):
            times.append(elapsed)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)

    from vllm_zipar.serving.offline import ImageGenerator

    name, shape, window, context = (
        ("small-16", SMALL_16, 4, (100, 200))
        if args.quick
        else ("llamagen-b-24", LLAMAGEN_B_24, 8, (250, 350))
    )
    model_dir = random_model(name, shape)
    rows = []
    with ImageGenerator(model_dir, max_num_seqs=4, kv_cache_memory_bytes=1 << 30) as generator:
        step_times(generator, 1, None, 1, context)  # warm-up
        for count in (1, 2):
            stock = step_times(generator, count, None, 1, context)
            zipar = step_times(generator, count, window, shape["grid_size"] // window, context)
            row = {
                "requests": count,
                "stock_k1_ms": 1e3 * statistics.median(stock),
                f"zipar_k{shape['grid_size'] // window}_ms": 1e3 * statistics.median(zipar),
                "samples": [len(stock), len(zipar)],
            }
            row["ratio"] = statistics.median(zipar) / statistics.median(stock)
            rows.append(row)
            print(
                f"[bench] {count} request(s): stock k=1 {row['stock_k1_ms']:.1f} ms, ZipAR "
                f"k={shape['grid_size'] // window} {1e3 * statistics.median(zipar):.1f} ms per step: "
                f"ratio {row['ratio']:.2f} (target <= 1.25)",
                flush=True,
            )
    path = write_json(
        "attention_cost" + ("_quick" if args.quick else ""),
        {"model": name, "window": window, "context": context, "machine": machine(), "rows": rows},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
