"""What sampling one engine step's cells costs: the per-cell generator loop before, the batched sampler now.

Times `sample_cells` (one batch of tensor ops, counter-based noise) against the sampler at commit a71361e
(a Python loop over cells, each drawing its noise from its own CPU `torch.Generator`), on the same logits:
64 cells of the LlamaGen codebook (16,384 codes) with temperature only, top-k 2000, top-p 0.9, and a mix of
those with greedy rows (CPU time of one thread on the CPU, synchronised wall time on a GPU; medians, the
two samplers alternating). It also times the noise alone, and checks that the noise on `--device` equals the
host's bit for bit (all 2^24 uniforms through the log, a few full cells) and numpy's independent log.
Pure PyTorch (no vLLM import), so it runs on a GPU machine without vLLM:

    python benchmarks/sampling_cost.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, bar_plot, machine, write_json  # noqa: E402

from vllm_zipar.engine.noise import UNIFORM_BITS, as_int64, exponential_from_bits, exponential_noise  # noqa: E402
from vllm_zipar.engine.sampling import CPU_BLOCK_ELEMENTS, sample_cells  # noqa: E402
from vllm_zipar.zipar.seeding import cell_seed  # noqa: E402

RANDOM_KINDS = [(1.0, 0, 1.0), (0.7, 2000, 1.0), (1.0, 0, 0.9), (0.9, 1000, 0.95)]
SCENARIOS = {
    "temperature 1.0": [(1.0, 0, 1.0)],
    "top-k 2000": [(1.0, 2000, 1.0)],
    "top-p 0.9": [(1.0, 0, 0.9)],
    "mixed + greedy": [*RANDOM_KINDS, (0.0, 0, 1.0)],
}


def per_cell_loop(logits, temperatures, top_ks, top_ps, seeds, positions) -> list[int]:
    """The sampler this benchmark replaces (vllm_zipar/engine/sampling.py at a71361e), kept to time it."""
    logits = logits.float()
    tokens = []
    for i in range(logits.shape[0]):
        row = logits[i]
        if temperatures[i] <= 0.0:
            tokens.append(int(torch.argmax(row)))
            continue
        scaled = row / temperatures[i]
        vocab = scaled.shape[-1]
        if 0 < top_ks[i] < vocab:
            kth = torch.topk(scaled, top_ks[i]).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if top_ps[i] < 1.0:
            sorted_logits, order = scaled.sort(descending=False)
            drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - top_ps[i]
            drop_sorted[-1] = False
            scaled = scaled.masked_fill(
                torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf")
            )
        probs = scaled.softmax(dim=-1)
        generator = torch.Generator(device="cpu").manual_seed(cell_seed(seeds[i], positions[i]))
        q = torch.rand(probs.shape, dtype=torch.float32, generator=generator).log_().neg_()
        tokens.append(int(torch.argmax(probs / q.to(probs.device))))
    return tokens


def per_cell_noise(cells: int, vocab: int, device: torch.device) -> torch.Tensor:
    """The old noise alone: one CPU generator per cell, copied to the device."""
    rows = []
    for i in range(cells):
        generator = torch.Generator(device="cpu").manual_seed(cell_seed(7, i))
        rows.append(torch.rand(vocab, generator=generator).log_().neg_().to(device))
    return torch.stack(rows)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_pair(before, after, device: torch.device, repeats: int) -> tuple[list[float], list[float]]:
    """Milliseconds per call of each, the two calls alternating so that load on the machine hits both.

    On the CPU the clock is this process's CPU time (one thread): on a shared machine wall time mostly
    measures the other users. On a GPU it is wall time between synchronisations.
    """
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    before(), after()  # warm-up
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in zip((before, after), samples, strict=True):
            sync(device)
            start = clock()
            fn()
            sync(device)
            out.append((clock() - start) * 1e3)
    return samples


def summary(before: list[float], after: list[float]) -> dict[str, object]:
    row: dict[str, object] = {
        "before_ms": statistics.median(before),
        "after_ms": statistics.median(after),
        "before_min_ms": min(before),
        "after_min_ms": min(after),
        "before_samples_ms": before,
        "after_samples_ms": after,
    }
    row["before_over_after"] = row["before_ms"] / row["after_ms"]
    return row


def noise_checks(device: torch.device, vocab: int, domain_bits: int) -> dict[str, int]:
    """Mismatching float32 noise values: device vs numpy's log over uniforms, device vs host over cells."""
    bits = torch.arange(1 << domain_bits, dtype=torch.int64) << (UNIFORM_BITS - domain_bits)
    on_device = exponential_from_bits(bits.to(device)).cpu()
    u = (bits.numpy().astype(np.float64) + 0.5) / 2.0**UNIFORM_BITS
    by_numpy = torch.from_numpy((-np.log(u)).astype(np.float32))
    pairs = [(0, 0), (1, 575), (2**63 - 1, 17), (12345, -1)]
    seeds = torch.tensor([as_int64(s) for s, _ in pairs])
    positions = torch.tensor([p for _, p in pairs])
    host = exponential_noise(seeds, positions, vocab)
    device_cells = exponential_noise(seeds.to(device), positions.to(device), vocab).cpu()
    return {
        "uniforms_checked": len(bits),
        "log_mismatches_vs_numpy": int((on_device.view(torch.int32) != by_numpy.view(torch.int32)).sum()),
        "cell_values_checked": host.numel(),
        "cell_mismatches_device_vs_host": int(
            (device_cells.view(torch.int32) != host.view(torch.int32)).sum()
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cells", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="8 cells, 3 repeats, 2^16 uniforms checked")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    cells, repeats = (8, 3) if args.quick else (args.cells, args.repeats)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(cells, args.vocab, generator=gen) * 3).to(device)
    rows = []
    calls = {}
    for name, kinds in SCENARIOS.items():
        params = [kinds[i % len(kinds)] for i in range(cells)]
        call = (
            logits,
            [t for t, _, _ in params],
            [k for _, k, _ in params],
            [p for _, _, p in params],
            [1000 + i // 4 for i in range(cells)],  # 4 cells per image, like a ZipAR step at window 4
            [300 + i for i in range(cells)],
        )
        calls[name] = call
        before, after = timed_pair(
            lambda call=call: per_cell_loop(*call), lambda call=call: sample_cells(*call), device, repeats
        )
        row = {"scenario": name, **summary(before, after)}
        rows.append(row)
        print(
            f"[sampling] {name:>16}: per-cell loop {row['before_ms']:8.2f} ms, "
            f"batched {row['after_ms']:8.2f} ms  -> before/after {row['before_over_after']:.2f}x "
            f"({cells} cells, vocab {args.vocab})"
        )
    seeds, positions = torch.full((cells,), 7, device=device), torch.arange(cells, device=device)
    block = max(1, CPU_BLOCK_ELEMENTS // args.vocab) if device.type == "cpu" else cells  # as the sampler does
    noise = summary(
        *timed_pair(
            lambda: per_cell_noise(cells, args.vocab, device),
            lambda: [
                exponential_noise(seeds[i : i + block], positions[i : i + block], args.vocab)
                for i in range(0, cells, block)
            ],
            device,
            repeats,
        )
    )
    print(
        f"[sampling] noise alone: per-cell generators {noise['before_ms']:.2f} ms, "
        f"counter-based {noise['after_ms']:.2f} ms"
    )
    checks = noise_checks(device, args.vocab, 16 if args.quick else UNIFORM_BITS)
    # Tokens can differ across devices only where the logits pipeline does (softmax, cumsum), not the noise.
    mixed = calls["mixed + greedy"]
    checks["mixed_tokens_equal_to_host"] = sum(
        a == b for a, b in zip(sample_cells(*mixed), sample_cells(mixed[0].cpu(), *mixed[1:]), strict=True)
    )
    print(f"[sampling] noise checks on {device}: {checks}")
    name = (
        "sampling_cost"
        + ("_quick" if args.quick else "")
        + ("" if device.type == "cpu" else f"_{device.type}")
    )
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    result = {
        "machine": machine(),
        "device": str(device),
        "device_name": device_name,
        "cells": cells,
        "vocab": args.vocab,
        "repeats": repeats,
        "clock": "process CPU time, 1 thread" if device.type == "cpu" else "wall time, synchronised",
        "rows": rows,
        "noise": noise,
        "checks": checks,
    }
    print(f"[sampling] wrote {write_json(name, result)}")
    try:
        panels = [
            (row["scenario"], ["per-cell loop", "batched"], [row["before_ms"], row["after_ms"]])
            for row in rows
        ]
        panels.append(("noise alone", ["per-cell loop", "batched"], [noise["before_ms"], noise["after_ms"]]))
        clock = "CPU ms, 1 thread" if device.type == "cpu" else "ms"
        title = f"Sampling {cells} cells, vocab {args.vocab}, {device_name or device}: {clock} per step"
        print(f"[sampling] wrote {bar_plot(name, title, panels)}")
    except ImportError:  # a bare GPU machine may lack matplotlib: the JSON is the result
        print(f"[sampling] no matplotlib: no plot (results in {RESULTS})")


if __name__ == "__main__":
    main()
