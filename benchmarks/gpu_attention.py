"""One ZipAR step's attention vs a causal decode step, FlexAttention over vLLM's paged cache, no vLLM needed.

For each model shape (LlamaGen-L 16x64, LlamaGen-XL 20x64, Emu3-8B 32 query / 8 KV heads x128), images in
flight (1 / 16 / 64), context (300 / 1,200 / 8,200 tokens per stream) and guidance (off, or CFG: both streams
in one request), times one attention call of:

* ZipAR: the query set of a real window-8 `ZipARPlan` pass (proxies and KV-only inputs included), each image
  one request of the paged cache, the mask `flex_mask.zipar_visible` over `ZipARMaskBuffers` filled with
  every token the plan fed so far, called as vLLM's FlexAttention backend calls flex (`paged_flex.py`);
* flex causal: 1-token decode of every sequence (2 per image with CFG) over the same paged cache, same call;
* SDPA decode: `scaled_dot_product_attention`, one batched call, one query per sequence over dense KV
  gathered from the pages beforehand (not timed), all sequences of equal length (the shortest stream's
  context) so no mask is needed and the fastest kernel applies (with GQA, the faster of `enable_gqa` and
  KV expanded beforehand): the fastest fair baseline we have, so the ratio is conservative.

Every output is checked against a float32 dense-mask SDPA reference whose mask is built from the plan's fed
inputs (the rule of `plan.visible`); a case off by more than the dtype's tolerance prints WRONG and the script
exits 1 after measuring the rest. It also counts the compilations that 50 steps of varying batch and query
sizes trigger (recompile limit 16, as vLLM sets it). bf16 and inductor-compiled flex on CUDA; float32 on CPU
(flex traced by dynamo, run unfused). Prints the table; writes benchmarks/results/gpu_attention_<device>
.json/.png (`--quick`: gpu_attention_quick).

    python benchmarks/gpu_attention.py [--quick] [--budget-s 420] [--shapes ...] [--images ...]
    python benchmarks/gpu_attention.py --plot results.json    # the PNG only (no matplotlib on the GPU box)
    bash benchmarks/gpu_check.sh                              # the prepared run for a lent GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters, guard_failures
from torch.nn.attention.flex_attention import flex_attention

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import machine, save_figure, write_json  # noqa: E402
from paged_flex import (  # noqa: E402
    BLOCK,
    RECOMPILE_LIMIT,
    PagedCache,
    PagedStep,
    PersistentTensors,
    causal,
    cdiv,
    flex_compiled,
    run_flex,
    shuffled_block_table,
)

from vllm_zipar.engine.flex_mask import ZipARMaskBuffers, zipar_visible  # noqa: E402
from vllm_zipar.zipar.guidance import image_plan  # noqa: E402
from vllm_zipar.zipar.layout import GridLayout  # noqa: E402
from vllm_zipar.zipar.plan import FeedKind, visible  # noqa: E402

WINDOW = 8
STAGGER = 4  # images of a batch sit at up to this many consecutive passes of the plan
TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-4}  # bf16: output rounding ~1e-3 here
GOAL = 1.2  # ZipAR step / causal decode step at 16 and 64 images (issue 13)


@dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    family: str  # "llamagen": 24-wide grid, proxies; "emu3": 90-wide grid with an EOL column


FULL_SHAPES = [  # XL last: closest to L, so the first to give up when the time budget runs out
    Shape("LlamaGen-L", 16, 16, 64, 24, "llamagen"),
    Shape("Emu3-8B", 32, 8, 128, 32, "emu3"),
    Shape("LlamaGen-XL", 20, 20, 64, 36, "llamagen"),
]
QUICK_SHAPES = [Shape("tiny-MHA", 4, 4, 32, 2, "llamagen"), Shape("tiny-GQA", 4, 2, 32, 2, "emu3")]


def layout_for(family: str, context: int) -> tuple[GridLayout, int]:
    """The grid and unconditional prompt length of a family, with rows enough to be mid-image at `context`.

    LlamaGen: c2i at 384 px (24 wide, 1 class token; ~3 inputs a pass at window 8, as in the paper).
    Emu3: 90 wide plus EOL, a 64-token prompt. Rows past the native height only keep the measured pass in
    the steady state; attention cost depends on the KV length and the query set, not on the grid's height.
    """
    if family == "llamagen":
        return GridLayout(1, cdiv(context, 24) + 12, 24), 1
    return GridLayout(64, cdiv(context, 91) + 12, 90, eol=True, eol_token=1), 64


@dataclass
class PlayedPlan:
    """A window-8 plan played with dummy tokens: per-token fields of its feed order, and pass boundaries."""

    positions: torch.Tensor
    steps: torch.Tensor
    streams: torch.Tensor
    proxy: torch.Tensor
    bounds: list[int]  # bounds[s]: tokens fed before pass s; pass s feeds bounds[s]:bounds[s+1]
    history: list  # the FedInputs (for the pure-Python cross-check of the reference mask)

    @classmethod
    def play(cls, family: str, guided: bool, tokens: int) -> PlayedPlan:
        layout, uncond = layout_for(family, tokens)
        plan = image_plan(layout, WINDOW, uncond if guided else None)
        prompt = layout.prompt_len + (uncond if guided else 0)
        plan.prefill_inputs([0] * prompt)
        plan.record([0])
        bounds = [0, plan.num_fed]
        while plan.num_fed < (2 if guided else 1) * tokens + 64:
            inputs = plan.next_inputs()
            if not inputs:
                raise RuntimeError(f"{family} plan ended before {tokens} tokens")
            plan.record([0] * sum(f.predicts is not None and f.stream == 0 for f in inputs))
            bounds.append(plan.num_fed)
        fed = plan.history
        return cls(
            positions=torch.tensor([f.position for f in fed], dtype=torch.int32),
            steps=torch.tensor([f.step for f in fed], dtype=torch.int32),
            streams=torch.tensor([f.stream for f in fed], dtype=torch.int8),
            proxy=torch.tensor([f.kind is FeedKind.PROXY for f in fed]),
            bounds=bounds,
            history=fed,
        )

    def pass_at(self, tokens: int) -> int:
        """The first pass that starts with at least `tokens` fed (at least `STAGGER`: passes before it
        exist for the staggered images of a batch)."""
        return next(s for s in range(STAGGER, len(self.bounds) - 1) if self.bounds[s] >= tokens)

    def reference_mask(self, start: int, end: int) -> torch.Tensor:
        """`[end-start, end]` bool: may query `start+i` see key `j`? `plan.visible`'s rule, vectorised."""
        q = torch.arange(start, end)
        same = self.streams[:end][None, :] == self.streams[q][:, None]
        earlier = (self.positions[:end][None, :] <= self.positions[q][:, None]) & (
            self.steps[:end][None, :] <= self.steps[q][:, None]
        )
        itself = torch.arange(end)[None, :] == q[:, None]
        return itself | (same & earlier & ~self.proxy[:end][None, :])

    def check_reference_mask(self, start: int, end: int) -> None:
        """The vectorised mask equals `plan.visible` pair by pair (small passes only: pure Python)."""
        mask = self.reference_mask(start, end)
        fed = self.history
        for i in range(start, end):
            for j in range(end):
                if bool(mask[i - start, j]) != visible(fed[j], fed[i], j, i):
                    raise AssertionError(f"reference mask differs from plan.visible at query {i}, key {j}")


@dataclass
class Request:
    """One image of a ZipAR step: pass `pass_index` of `plan`."""

    plan: PlayedPlan
    pass_index: int

    @property
    def start(self) -> int:
        return self.plan.bounds[self.pass_index]

    @property
    def end(self) -> int:
        return self.plan.bounds[self.pass_index + 1]

    def stream_context(self, stream: int) -> int:
        return int((self.plan.streams[: self.start] == stream).sum())


class Timer:
    """Median milliseconds per call: CUDA events on GPU, perf_counter on CPU; warm-up first."""

    def __init__(self, device: torch.device, warmup: int, reps: int, inner: int) -> None:
        self.cuda = device.type == "cuda"
        self.warmup, self.reps, self.inner = warmup, reps, inner

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        self._sync()
        samples = []
        for _ in range(self.reps):
            if self.cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                for _ in range(self.inner):
                    fn()
                end.record()
                end.synchronize()
                samples.append(begin.elapsed_time(end) / self.inner)
            else:
                t0 = time.perf_counter()
                for _ in range(self.inner):
                    fn()
                samples.append((time.perf_counter() - t0) * 1e3 / self.inner)
        samples.sort()
        return samples[len(samples) // 2]

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class GraphedTimer:
    """Milliseconds per replay of a CUDA graph of `fn`: the kernels alone, as vLLM's full CUDA graphs run
    them (no Python, no dynamo guards). None off CUDA, and for good after a capture fails (printed)."""

    def __init__(self, timer: Timer, enabled: bool) -> None:
        self.timer, self.enabled = timer, enabled

    def __call__(self, fn) -> float | None:
        if not self.enabled:
            return None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
        except Exception as error:  # noqa: BLE001 - any capture failure only ends the graphed timings
            print(f"[bench] note: CUDA graph capture failed ({type(error).__name__}: {error}); eager only")
            self.enabled = False
            return None
        return self.timer(graph.replay)


class FlexCall:
    """Compiled flex as vLLM calls it; on CPU a failed inductor compile falls back to eager, with a note."""

    def __init__(self, device: torch.device, mode: str) -> None:
        self.device, self.mode = device, mode
        self.fn = {
            "inductor": flex_compiled,
            "dynamo-eager": torch.compile(flex_attention, fullgraph=True, backend="eager"),
            "eager": flex_attention,
        }[mode]

    def __call__(self, *args):
        try:
            return run_flex(self.fn, *args)
        except Exception as error:  # noqa: BLE001 - inductor raises many types; only CPU falls back
            if self.device.type == "cuda" or self.mode != "inductor":
                raise
            lines = [line for line in str(error).splitlines() if line.strip() and "TORCHDYNAMO" not in line]
            reason = f"{type(error).__name__}: {(lines or [''])[0][:200]}"
            print(f"[bench] note: compiled flex failed on CPU ({reason}); using eager flex")
            self.mode, self.fn = "eager", flex_attention
            return run_flex(self.fn, *args)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def recompile_reasons() -> list[str]:
    """The first failed guard of each recompilation since the last dynamo reset."""
    reasons = []
    for failures in guard_failures.values():
        for reason in failures:
            lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
            reasons.append(lines[0][:160] if lines else "")
    return reasons


class ShapeBench:
    """One model shape's fixed paged cache and ZipAR buffers (sized once, as an engine sizes them)."""

    def __init__(self, shape, plans, max_images, max_tokens, dtype, device, flex, timer, seed) -> None:
        self.shape, self.plans, self.dtype, self.device = shape, plans, dtype, device
        self.flex, self.timer = flex, timer
        self.graphed = GraphedTimer(timer, enabled=False)
        self.generator = torch.Generator().manual_seed(seed)
        self.width = cdiv(max_tokens + 2 * BLOCK, BLOCK)  # pages a request may hold (both streams)
        # Room for the largest step (a ZipAR and a causal step draw their pages independently), 5% spare.
        pages = max_images * self.width
        self.num_blocks = pages + pages // 20 + 1
        torch.manual_seed(seed)
        self.cache = PagedCache.random(self.num_blocks, shape.kv_heads, shape.head_dim, dtype, device)
        max_seqs = 2 * max_images
        # One set per kind of step: each is timed repeatedly while the other's step also exists.
        self.zipar_persistent, self.causal_persistent = (
            PersistentTensors(max_seqs, 64 * max_seqs, self.num_blocks, self.width, device) for _ in range(2)
        )
        self.buffers = ZipARMaskBuffers.allocate(max_images, self.width * BLOCK, max_images, device)
        self.scale = shape.head_dim**-0.5

    def queries(self, count: int) -> torch.Tensor:
        return torch.randn(count, self.shape.heads, self.shape.head_dim, dtype=self.dtype, device=self.device)

    def zipar_step(self, requests: list[Request]) -> tuple[PagedStep, torch.Tensor]:
        """Block table, buffers (every fed token) and step metadata of one ZipAR step."""
        lens = [r.end for r in requests]
        table = shuffled_block_table(lens, self.num_blocks, self.generator, self.width)
        slots, tokens, fields = [], [], ([], [], [], [])
        for slot, r in enumerate(requests):
            slots.append(torch.full((r.end,), slot))
            tokens.append(torch.arange(r.end))
            sources = (r.plan.positions, r.plan.steps, r.plan.streams, r.plan.proxy)
            for out, src in zip(fields, sources, strict=True):
                out.append(src[: r.end])
        self.buffers.write_tokens(torch.cat(slots), torch.cat(tokens), *(torch.cat(f) for f in fields))
        self.buffers.set_batch_slots(torch.arange(len(requests)))
        step = PagedStep(self.cache, self.zipar_persistent, table, lens, [r.end - r.start for r in requests])
        return step, table

    @staticmethod
    def new_tokens(requests: list[Request]) -> tuple[torch.Tensor, ...]:
        """The `write_tokens` arguments for the tokens a step feeds (those it adds to the buffers)."""
        columns: list[list[torch.Tensor]] = [[] for _ in range(6)]
        for slot, r in enumerate(requests):
            span = slice(r.start, r.end)
            values = (torch.full((r.end - r.start,), slot), torch.arange(r.start, r.end))
            values += (r.plan.positions[span], r.plan.steps[span], r.plan.streams[span], r.plan.proxy[span])
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        return tuple(torch.cat(column) for column in columns)

    def zipar_mask(self, step: PagedStep):
        buffers = self.buffers
        return step.mask_mod(lambda request, q, kv: zipar_visible(buffers, request, q, kv))

    def run_case(self, images: int, guided: bool, context: int) -> dict:
        plan = self.plans[guided]
        streams = 2 if guided else 1
        last = plan.pass_at(streams * context)
        requests = [Request(plan, last - (i % STAGGER)) for i in range(images)]
        step, table = self.zipar_step(requests)
        query = self.queries(step.num_tokens)
        mask_mod = self.zipar_mask(step)
        zipar_block_mask = step.block_mask(mask_mod)
        zipar_out = self.flex(query, self.cache, zipar_block_mask, self.scale)
        zipar_delta, mask_effect = self.check_zipar(requests, table, query, zipar_out)

        # Causal decode: every stream of every image its own sequence, one query at the shortest context.
        length = min(r.stream_context(s) for r in requests for s in range(streams)) + 1
        seqs = images * streams
        causal_table = shuffled_block_table([length] * seqs, self.num_blocks, self.generator, self.width)
        causal_step = PagedStep(self.cache, self.causal_persistent, causal_table, [length] * seqs, [1] * seqs)
        causal_query = self.queries(seqs)
        causal_block_mask = causal_step.block_mask(causal_step.mask_mod(causal))
        flex_causal_out = self.flex(causal_query, self.cache, causal_block_mask, self.scale)
        dense = [self.cache.dense(causal_table[i], length) for i in range(seqs)]
        keys = torch.stack([k for k, _ in dense])
        values = torch.stack([v for _, v in dense])
        del dense
        sdpa_query = causal_query[:, :, None, :]
        gqa = self.shape.heads != self.shape.kv_heads

        def sdpa():
            return F.scaled_dot_product_attention(sdpa_query, keys, values, scale=self.scale, enable_gqa=gqa)

        if gqa:  # GQA may keep SDPA off its fastest kernel: also time KV expanded beforehand, keep the faster
            groups = self.shape.heads // self.shape.kv_heads
            wide_keys, wide_values = (t.repeat_interleave(groups, dim=1) for t in (keys, values))

            def sdpa_expanded():
                return F.scaled_dot_product_attention(sdpa_query, wide_keys, wide_values, scale=self.scale)

        sdpa_out = sdpa()[:, :, 0, :]
        ref = F.scaled_dot_product_attention(
            sdpa_query.float(), keys.float(), values.float(), scale=self.scale, enable_gqa=gqa
        )[:, :, 0, :]
        sdpa_delta = (sdpa_out.float() - ref).abs().max().item()
        if gqa:
            sdpa_delta = max(sdpa_delta, (sdpa_expanded()[:, :, 0, :].float() - ref).abs().max().item())
        flex_causal_delta = (flex_causal_out.float() - ref).abs().max().item()
        tolerance = TOLERANCE[self.dtype]
        correct = max(zipar_delta, sdpa_delta, flex_causal_delta) <= tolerance
        if not correct:  # loud, but the run goes on measuring: main exits non-zero at the end
            print(
                f"[bench] WRONG: {self.shape.name} {images} images cfg={guided} ctx {context}: max |delta| "
                f"zipar {zipar_delta:.3g}, flex causal {flex_causal_delta:.3g}, sdpa {sdpa_delta:.3g} "
                f"> {tolerance}"
            )

        new_tokens = self.new_tokens(requests)

        def zipar_build():  # per step, beyond what causal decode does: upload the fed tokens' fields
            self.buffers.write_tokens(*new_tokens)
            self.buffers.set_batch_slots(torch.arange(images))
            step.block_mask(mask_mod)

        ms = {
            "zipar_flex": self.timer(lambda: self.flex(query, self.cache, zipar_block_mask, self.scale)),
            "causal_flex": self.timer(
                lambda: self.flex(causal_query, self.cache, causal_block_mask, self.scale)
            ),
            "sdpa_decode": self.timer(sdpa),
            **({"sdpa_decode_expanded_kv": self.timer(sdpa_expanded)} if gqa else {}),
            "zipar_block_mask": self.timer(lambda: step.block_mask(mask_mod)),
            "causal_block_mask": self.timer(lambda: causal_step.block_mask(causal_step.mask_mod(causal))),
            "zipar_step_setup": self.timer(zipar_build),
        }
        baseline = min(ms["sdpa_decode"], ms.get("sdpa_decode_expanded_kv", float("inf")))
        graphed = {
            "zipar_flex": self.graphed(lambda: self.flex(query, self.cache, zipar_block_mask, self.scale)),
            "causal_flex": self.graphed(
                lambda: self.flex(causal_query, self.cache, causal_block_mask, self.scale)
            ),
            "sdpa_decode": self.graphed(sdpa_expanded if gqa and baseline < ms["sdpa_decode"] else sdpa),
        }
        layers = self.shape.layers
        return {
            "shape": self.shape.name,
            "images": images,
            "cfg": guided,
            "context": context,
            "zipar_tokens": step.num_tokens,
            "queries_per_image": step.num_tokens / images,
            "zipar_kv_per_image": sum(r.end for r in requests) / images,
            "causal_sequences": seqs,
            "causal_kv_per_sequence": length,
            "ms": ms,
            "sdpa_baseline_ms": baseline,
            "ratio_vs_sdpa": ms["zipar_flex"] / baseline,
            "ratio_vs_flex_causal": ms["zipar_flex"] / ms["causal_flex"],
            "graphed_ms": graphed,
            "graphed_ratio_vs_sdpa": (
                graphed["zipar_flex"] / graphed["sdpa_decode"] if None not in graphed.values() else None
            ),
            # A model step: attention in every layer plus the per-step set-up that causal decode does not
            # need (buffers, block mask; shared by the layers; vLLM builds a causal block mask too).
            "step_ratio_vs_sdpa": (layers * ms["zipar_flex"] + ms["zipar_step_setup"]) / (layers * baseline),
            "max_abs_delta": {
                "zipar_flex": zipar_delta,
                "causal_flex": flex_causal_delta,
                "sdpa": sdpa_delta,
            },
            "zipar_mask_effect": mask_effect,
            "tolerance": tolerance,
            "correct": correct,
        }

    def check_zipar(self, requests, table, query, out) -> tuple[float, float]:
        """Max |flex - reference| over the step and max |reference - causal reference| (the mask's effect)."""
        delta = effect = 0.0
        offset = 0
        gqa = self.shape.heads != self.shape.kv_heads
        for i, r in enumerate(requests):
            k = r.end - r.start
            key, value = (t.float() for t in self.cache.dense(table[i], r.end))
            q = query[offset : offset + k].float().transpose(0, 1)
            mask = r.plan.reference_mask(r.start, r.end).to(self.device)
            causal_mask = (
                torch.arange(r.end, device=self.device)[None, :]
                <= torch.arange(r.start, r.end, device=self.device)[:, None]
            )
            ref, ref_causal = (
                F.scaled_dot_product_attention(q, key, value, attn_mask=m, scale=self.scale, enable_gqa=gqa)
                for m in (mask, causal_mask)
            )
            got = out[offset : offset + k].float().transpose(0, 1)
            delta = max(delta, (got - ref).abs().max().item())
            effect = max(effect, (ref - ref_causal).abs().max().item())
            offset += k
        return delta, effect

    def compile_run(self, steps: int, max_images: int, contexts: tuple[int, int], seed: int) -> dict:
        """`steps` ZipAR steps of random batch (guided and plain images mixed) and pass: compilations."""
        rng = random.Random(seed)
        torch._dynamo.reset()
        before = graphs()
        batch_sizes, token_counts = [], []
        t0 = time.perf_counter()
        for _ in range(steps):
            requests = []
            for _ in range(rng.randint(1, max_images)):
                guided = rng.random() < 0.5
                plan = self.plans[guided]
                tokens = rng.randint(*contexts) * (2 if guided else 1)
                requests.append(Request(plan, plan.pass_at(tokens)))
            step, _ = self.zipar_step(requests)
            self.flex(
                self.queries(step.num_tokens), self.cache, step.block_mask(self.zipar_mask(step)), self.scale
            )
            batch_sizes.append(len(requests))
            token_counts.append(step.num_tokens)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        compiled = graphs() - before
        return {
            "shape": self.shape.name,
            "steps": steps,
            "flex_mode": self.flex.mode,
            "compilations": compiled,
            "recompile_limit": RECOMPILE_LIMIT,
            "limit_reached": compiled >= RECOMPILE_LIMIT,
            "batch_sizes": batch_sizes,
            "query_tokens": token_counts,
            "seconds": time.perf_counter() - t0,
            "recompile_reasons": recompile_reasons(),
        }


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def plot(name: str, title: str, rows: list[dict], shapes: list[Shape]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shapes), figsize=(4.6 * len(shapes), 3.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for (context, guided), color in zip(
            sorted({(r["context"], r["cfg"]) for r in rows}), plt.cm.tab10.colors * 4, strict=False
        ):
            line = sorted(
                (
                    r
                    for r in rows
                    if r["shape"] == shape.name and (r["context"], r["cfg"]) == (context, guided)
                ),
                key=lambda r: r["images"],
            )
            if line:
                ax.plot(
                    [r["images"] for r in line],
                    [r["ratio_vs_sdpa"] for r in line],
                    "o" + ("--" if guided else "-"),
                    color=color,
                    label=f"ctx {context}" + (" CFG" if guided else ""),
                )
        ax.axhline(GOAL, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(
            sorted({r["images"] for r in rows}), [str(n) for n in sorted({r["images"] for r in rows})]
        )
        ax.set_xlabel("images in flight")
        ax.set_ylabel("ZipAR step / SDPA decode step")
        ax.set_title(f"{shape.name} ({shape.heads}q/{shape.kv_heads}kv x {shape.head_dim})", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, name)


TABLE_HEADER = (
    "shape        img cfg   ctx  q/img |  ZipAR ms  flexc ms   SDPA ms  mask ms | "
    "Z/SDPA Z/flex  step graphZ/S | max|d|  mask effect"
)


def print_row(row: dict) -> None:
    ms = row["ms"]
    graphed = "-" if row["graphed_ratio_vs_sdpa"] is None else f"{row['graphed_ratio_vs_sdpa']:.2f}"
    print(
        f"{row['shape']:12s} {row['images']:3d} {'CFG' if row['cfg'] else '   '} {row['context']:5d} "
        f"{row['queries_per_image']:5.2f} | {ms['zipar_flex']:8.3f} {ms['causal_flex']:8.3f} "
        f"{row['sdpa_baseline_ms']:8.3f} {ms['zipar_block_mask']:8.3f} | {row['ratio_vs_sdpa']:6.2f} "
        f"{row['ratio_vs_flex_causal']:6.2f} {row['step_ratio_vs_sdpa']:6.2f} {graphed:>8s} | "
        f"{row['max_abs_delta']['zipar_flex']:.1e} {row['zipar_mask_effect']:.1e}",
        flush=True,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes and contexts: seconds on a CPU")
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CUDA, also time CUDA-graph replays of each call (kernels only, as under vLLM's graphs)",
    )
    parser.add_argument("--plot", type=Path, help="only (re)draw the PNG of a results JSON, beside it")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining cases past this")
    parser.add_argument("--compile-steps", type=int, help="steps of the compilation count (50; --quick 12)")
    names = ",".join(s.name for s in FULL_SHAPES)
    parser.add_argument("--shapes", default=names, help=f"a subset of {names} (ignored with --quick)")
    parser.add_argument("--images", default="16,64,1", help="images in flight, in the order run")
    parser.add_argument("--contexts", default="300,1200,8200", help="tokens per stream before the step")
    parser.add_argument(
        "--cpu-flex",
        choices=["dynamo-eager", "inductor", "eager"],
        default="dynamo-eager",
        help="how flex runs on CPU (CUDA always compiles with inductor). dynamo-eager: traced by dynamo, "
        "so compilations are counted, run unfused; inductor's CPU lowering fails on the paged block mask",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot:
        common.RESULTS = args.plot.resolve().parent
        plot_results(args.plot.stem, json.loads(args.plot.read_text()))
        return 0
    started = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    mode = "inductor" if device.type == "cuda" else args.cpu_flex
    if args.quick:
        shapes, batches, contexts = QUICK_SHAPES, [1, 3], [120]
        compile_steps, compile_images, compile_contexts = args.compile_steps or 12, 3, (70, 120)
        timer = Timer(device, warmup=1, reps=2, inner=1)
    else:
        by_name = {s.name: s for s in FULL_SHAPES}
        shapes = [by_name[n] for n in args.shapes.split(",")]
        batches = [int(n) for n in args.images.split(",")]
        contexts = [int(n) for n in args.contexts.split(",")]
        hi = min(1200, max(contexts))
        compile_steps, compile_images, compile_contexts = args.compile_steps or 50, 16, (hi // 12, hi)
        timer = Timer(device, warmup=3, reps=7, inner=5 if device.type == "cuda" else 1)
    print(f"[bench] {device_name}, {dtype}, flex: {mode}, window {WINDOW}")
    if device.type == "cpu" and mode != "inductor":
        print(f"[bench] note: CPU run, flex {mode!r} (not inductor-compiled): timings are not the kernels'")
    max_tokens = 2 * max(contexts) + 64
    plans: dict[str, dict[bool, PlayedPlan]] = {}
    for family in sorted({s.family for s in shapes}):
        plans[family] = {g: PlayedPlan.play(family, g, max(contexts)) for g in (False, True)}
    if args.quick:  # the vectorised reference mask is plan.visible itself (pure Python: small passes only)
        for family_plans in plans.values():
            for plan in family_plans.values():
                for s in (plan.pass_at(contexts[0]), plan.pass_at(contexts[0]) - 1):
                    plan.check_reference_mask(plan.bounds[s], plan.bounds[s + 1])
    print(f"[bench] plans played in {time.monotonic() - started:.1f} s")
    name = "gpu_attention_quick" if args.quick else f"gpu_attention_{device_slug(device_name)}"
    result = {
        "device": device_name,
        "dtype": str(dtype),
        "flex_mode": mode,
        "window": WINDOW,
        "quick": args.quick,
        "shapes": [dataclasses.asdict(s) for s in shapes],
        "machine": machine(),
        "baseline": "one batched SDPA call, dense KV gathered beforehand, equal lengths, no mask",
        "rows": [],
        "skipped": [],
        "compile_runs": [],
        "compilations_in_sweep": {},
    }
    print(TABLE_HEADER)
    graphed = GraphedTimer(timer, enabled=device.type == "cuda" and args.cuda_graphs)
    try:  # a time-out (SIGINT from gpu_check.sh) still gets the summary and the final JSON
        for index, shape in enumerate(shapes):
            torch._dynamo.reset()  # a fresh engine per shape: the recompile limit is per compiled function
            flex = FlexCall(device, mode)
            before = graphs()
            bench = ShapeBench(
                shape,
                plans[shape.family],
                max(*batches, compile_images),
                max_tokens,
                dtype,
                device,
                flex,
                timer,
                index,
            )
            bench.graphed = graphed
            for guided, context, images in itertools.product((False, True), contexts, batches):
                case = {"shape": shape.name, "images": images, "cfg": guided, "context": context}
                if time.monotonic() - started > args.budget_s:
                    result["skipped"].append(case)
                    continue
                case_start = time.monotonic()
                row = bench.run_case(images, guided, context)
                row["flex_mode"] = flex.mode
                row["case_seconds"] = time.monotonic() - case_start
                result["rows"].append(row)
                print_row(row)
                write_json(name, result)  # partial results survive a time-out
            result["compilations_in_sweep"][shape.name] = graphs() - before
            result.setdefault("recompile_reasons_in_sweep", {})[shape.name] = recompile_reasons()
            if index == 0 and time.monotonic() - started < args.budget_s:
                run = bench.compile_run(compile_steps, compile_images, compile_contexts, seed=0)
                result["compile_runs"].append(run)
                print(
                    f"[bench] {shape.name}: {run['steps']} ZipAR steps of 1..{compile_images} images, "
                    f"{min(run['query_tokens'])}..{max(run['query_tokens'])} query tokens: "
                    f"{run['compilations']} compilations "
                    f"(limit {run['recompile_limit']}, flex {run['flex_mode']}) in {run['seconds']:.0f} s"
                )
            del bench
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        result["interrupted"] = True
        print("[bench] interrupted: keeping the cases measured so far")
    summarise(result, args.budget_s)
    result["seconds"] = time.monotonic() - started
    path = write_json(name, result)
    print(f"[bench] wrote {path} in {result['seconds']:.0f} s")
    plot_results(name, result)
    wrong = [r for r in result["rows"] if not r["correct"]]
    if wrong:
        print(f"[bench] FAILED: {len(wrong)} cases differ from the dense-mask reference (WRONG lines above)")
    return 1 if wrong else 0


def plot_results(name: str, result: dict) -> None:
    """The PNG beside the JSON; skipped with a note where matplotlib is missing (re-plot with --plot)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("[bench] note: no matplotlib here; plot later with --plot <the JSON>")
        return
    shapes = [Shape(**fields) for fields in result["shapes"]]
    title = f"ZipAR-{WINDOW} step attention / causal decode ({result['device']}, {result['dtype']})"
    print(f"[bench] wrote {plot(name, title, result['rows'], shapes)}")


def summarise(result: dict, budget_s: float) -> None:
    print(f"[bench] summary ({result['device']}, {result['dtype']}, flex {result['flex_mode']}):")
    print(TABLE_HEADER)
    for row in result["rows"]:
        print_row(row)
    for images in (16, 64):
        ratios = [r["ratio_vs_sdpa"] for r in result["rows"] if r["images"] == images]
        if ratios:
            print(
                f"[bench] {images} images: ZipAR/SDPA decode "
                f"{min(ratios):.2f}..{max(ratios):.2f} (goal <= {GOAL})"
            )
    print(f"[bench] compilations per shape sweep: {result['compilations_in_sweep']}")
    if result["skipped"]:
        print(f"[bench] budget of {budget_s:.0f} s spent: {len(result['skipped'])} cases skipped")


if __name__ == "__main__":
    sys.exit(main())
