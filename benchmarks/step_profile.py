"""Where a step's time goes: each engine step of the real vLLM engine, split into phases.

    python benchmarks/step_profile.py                    # every scenario (a few minutes)
    python benchmarks/step_profile.py --scenarios 'llamagen-b-24/zipar8/*/16'   # fnmatch patterns
    python benchmarks/step_profile.py --quick --out DIR  # tiny shapes, a couple of steps: a smoke run

Scenarios: {LlamaGen-B 24x24, reduced Emu3 90x90} x {NTP, ZipAR-8} x {unguided, guided} x {1, 16 images in
flight}, named `model/decoding/guidance/in_flight`. Each runs `in_flight` images (seeds 0..n-1) submitted
together through `ImageGenerator.step` (one `LLMEngine.step` each) until they finish or `--max-steps` steps
are done (then the rest are aborted: Emu3's 8,100-pass NTP image is profiled over its first steps only).

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and the benchmark wraps the functions
of each phase with perf_counter timers, on the instances of one engine (and on vllm_zipar's
`ImageKeyMetadata.mask`) while it profiles; nothing in vLLM is changed and every wrapper is removed after.
Every timer is exclusive: a phase gets its function's time less the time of the timed functions it calls,
so the phases of a step add up to the step exactly, "other" being what no timer covers (the engine's own
glue between the phases). "details" hold single functions' inclusive times (overlapping, not additive).

    scheduling    ZipARScheduler.schedule (our plans and step inputs included)
    input_prep    the runner's execute_model less the forward and the logits: _update_states,
                  _prepare_inputs, the attention metadata, _preprocess; and the step's ZipAR masks and
                  the stock kernel's cut-down metadata, which the first attention layer builds for all
    attention     every attention layer's impl.forward (stock kernel + the masked kernel) and KV cache write
    forward_rest  the model's forward less attention (embeddings, projections, MLPs, norms)
    logits        model.compute_logits, the visual-column slice and the CFG combine (guided_logits)
    sampling      the runner's _sample less the logits work: the position-keyed sampler and its host lists
    output        sample_tokens less _sample, the scheduler's update_from_output, the output processor
    other         LLMEngine.step / EngineCore.step glue no timer covers

Tokens (scheduled), cells (sampled grid cells) and requests are recorded per step; the summary is the mean
per step over every profiled step and over the "steady" steps (no request admitted in that step). Writes
step_profile[_quick].json and .png to benchmarks/results (or `--out`). Timings are from one run on one
machine; compare scenarios of the same run only.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import itertools
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PHASES = ("scheduling", "input_prep", "attention", "forward_rest", "logits", "sampling", "output", "other")
COLOURS = ("#4c72b0", "#8172b2", "#c44e52", "#dd8452", "#937860", "#55a868", "#64b5cd", "#bbbbbb")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the scenario prefix and the cache directory
    label: str
    make: Any  # () -> model directory
    prompt: Any  # a class label or a text prompt
    cfg_scale: float  # guided scenarios
    request_kwargs: dict[str, Any]  # sampling as the model's zipar_vs_ntp benchmark runs it
    engine_kwargs: dict[str, Any]
    window: int  # ZipAR's window in the "zipar" scenarios


def model_specs(quick: bool) -> list[ModelSpec]:
    if quick:
        llamagen = ("small-16", "LlamaGen small 16x16", common.SMALL_16, 4)
        emu3 = ("emu3-small-16", "Emu3 small 16x16", common.EMU3_SMALL, 4)
    else:
        llamagen = ("llamagen-b-24", "LlamaGen-B 24x24", common.LLAMAGEN_B_24, 8)
        emu3 = ("emu3-reduced-90", "reduced Emu3 90x90", common.EMU3_REDUCED, 8)
    kv = {"kv_cache_memory_bytes": 2 << 30}
    return [
        ModelSpec(
            llamagen[0],
            llamagen[1],
            functools.partial(common.random_model, llamagen[0], llamagen[2]),
            prompt=0,
            cfg_scale=2.0,
            request_kwargs={"top_k": 0},  # as zipar_vs_ntp.py
            engine_kwargs=kv,
            window=llamagen[3],
        ),
        ModelSpec(
            emu3[0],
            emu3[1],
            functools.partial(common.random_emu3, emu3[0], emu3[2]),
            prompt="a red apple on a wooden table",
            cfg_scale=3.0,  # Emu3's own default; unguided runs use cfg 1 as zipar_vs_ntp_emu3.py does
            request_kwargs={},
            engine_kwargs=kv,
            window=emu3[3],
        ),
    ]


@dataclass(frozen=True)
class Scenario:
    model: ModelSpec
    window: int | None  # None: NTP
    guided: bool
    in_flight: int

    @property
    def name(self) -> str:
        decoding = "ntp" if self.window is None else f"zipar{self.window}"
        return f"{self.model.name}/{decoding}/{'guided' if self.guided else 'unguided'}/{self.in_flight}"

    @property
    def label(self) -> str:
        decoding = "NTP" if self.window is None else f"ZipAR-{self.window}"
        guidance = f"cfg {self.model.cfg_scale:g}" if self.guided else "no cfg"
        return f"{self.model.label} {decoding} {guidance} x{self.in_flight}"

    def request_kwargs(self) -> dict[str, Any]:
        decoding = {"decoding": "ntp"} if self.window is None else {"zipar_window": self.window}
        cfg = self.model.cfg_scale if self.guided else 1.0
        return {**self.model.request_kwargs, **decoding, "cfg_scale": cfg}


@dataclass
class StepRecord:
    tokens: int = 0
    cells: int = 0
    requests: int = 0
    admitted: int = 0  # requests scheduled for the first time in this step (their prefill)
    total_s: float = 0.0
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    details: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class StepClock:
    """Exclusive perf_counter timers on one engine's instances; one `StepRecord` per `step` call."""

    def __init__(self) -> None:
        self._stack: list[list[float]] = []  # per open timer: the inclusive time of its timed callees
        self._undo: list[tuple[Any, str, bool, Any]] = []
        self.record = StepRecord()

    def wrap(self, owner: Any, name: str, phase: str, detail: str | None = None, after=None) -> None:
        """Time `owner.name` (an instance's method or a module's function) as `phase`; its inclusive time
        also goes to `details[detail]`; `after(result)` sees each return value (step counters)."""
        original = getattr(owner, name)
        had_own = name in vars(owner)
        clock = self
        detail = detail or name

        @functools.wraps(original)
        def timed(*args, **kwargs):
            callees = [0.0]
            clock._stack.append(callees)
            start = time.perf_counter()
            try:
                result = original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                clock._stack.pop()
                clock.record.phases[phase] += elapsed - callees[0]
                clock.record.details[detail] += elapsed
                if clock._stack:
                    clock._stack[-1][0] += elapsed
            if after is not None:
                after(result)
            return result

        put(owner, name, timed)
        self._undo.append((owner, name, had_own, original))

    def step(self, run) -> tuple[Any, StepRecord]:
        """Run one engine step under the root timer; the step's record."""
        self.record = StepRecord()
        callees = [0.0]
        self._stack.append(callees)
        start = time.perf_counter()
        try:
            result = run()
        finally:
            total = time.perf_counter() - start
            self._stack.pop()
        record = self.record
        record.total_s = total
        record.phases["other"] += total - callees[0]
        return result, record

    def restore(self) -> None:
        for owner, name, had_own, original in reversed(self._undo):
            if had_own:  # a module's function: put it back
                put(owner, name, original)
            else:  # an instance attribute shadowing its class's method: drop it
                object.__delattr__(owner, name) if is_frozen(owner) else delattr(owner, name)
        self._undo.clear()


def is_frozen(owner: Any) -> bool:
    params = getattr(type(owner), "__dataclass_params__", None)
    return bool(params and params.frozen)


def put(owner: Any, name: str, value: Any) -> None:
    """setattr, also on a frozen dataclass instance (the runner's `VisualTokens`): benchmark-only timers."""
    if is_frozen(owner):
        object.__setattr__(owner, name, value)
    else:
        setattr(owner, name, value)


def instrument(generator) -> StepClock:
    """Timers on the in-process engine of `generator` (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    import vllm_zipar.engine.attention as zipar_attention
    import vllm_zipar.engine.runner as zipar_runner
    from vllm_zipar.engine.attention_mask import ImageKeyMetadata

    engine = generator.llm.llm_engine
    core = engine.engine_core.engine_core  # InprocClient -> EngineCore
    scheduler = core.scheduler
    runner = core.model_executor.driver_worker.worker.model_runner
    clock = StepClock()

    def count_scheduled(output) -> None:
        clock.record.tokens = output.total_num_scheduled_tokens
        clock.record.requests = len(output.num_scheduled_tokens)
        clock.record.admitted = len(output.scheduled_new_reqs)

    def count_cells(_) -> None:
        samples = runner._step_samples
        clock.record.cells = (
            sum(1 for _, _, cell in samples if cell >= 0) if samples else runner.input_batch.num_reqs
        )

    clock.wrap(scheduler, "schedule", "scheduling", after=count_scheduled)
    clock.wrap(scheduler, "_step_inputs", "scheduling", "schedule: _step_inputs")
    clock.wrap(scheduler, "update_from_output", "output")
    clock.wrap(runner, "execute_model", "input_prep")
    for name in ("_update_states", "_prepare_inputs", "_build_attention_metadata", "_preprocess"):
        clock.wrap(runner, name, "input_prep", f"input_prep: {name}")
    clock.wrap(runner, "_model_forward", "forward_rest")
    clock.wrap(runner.model, "compute_logits", "logits")
    clock.wrap(runner._visual_tokens, "visual_logits", "logits")
    clock.wrap(zipar_runner, "guided_logits", "logits")
    clock.wrap(runner, "sample_tokens", "output")
    clock.wrap(runner, "_sample", "sampling", after=count_cells)
    clock.wrap(zipar_runner, "sample_cells", "sampling", "sampling: sample_cells")
    impls = {id(m.impl): m.impl for m in runner.model.modules() if hasattr(m, "impl")}
    for impl in impls.values():
        clock.wrap(impl, "forward", "attention", "attention: impl.forward")
        if hasattr(impl, "do_kv_cache_update"):
            clock.wrap(impl, "do_kv_cache_update", "attention", "attention: kv cache write")
    clock.wrap(zipar_attention, "masked_paged_attention", "attention", "attention: masked kernel")
    # Host work the first attention layer of a step does once for all layers: the step's inputs, so
    # input_prep. The masks are built lazily per request (our class, wrapped while this engine profiles).
    clock.wrap(ImageKeyMetadata, "mask", "input_prep", "input_prep: ZipAR masks (host, in layer 0)")
    for impl in impls.values():
        if hasattr(impl, "_stock_metadata"):
            clock.wrap(impl, "_stock_metadata", "input_prep", "input_prep: stock metadata (in layer 0)")
    clock.wrap(engine.output_processor, "process_outputs", "output")
    return clock


def run_scenario(generator, clock: StepClock, scenario: Scenario, max_steps: int) -> dict[str, Any]:
    """Profile one scenario's steps; the per-step means."""
    kwargs = scenario.request_kwargs()
    ids = [f"{scenario.name}#{seed}" for seed in range(scenario.in_flight)]
    for seed, request_id in enumerate(ids):
        generator.add_request(request_id, scenario.model.prompt, seed=seed, **kwargs)
    records: list[StepRecord] = []
    finished = []
    while len(finished) < len(ids) and len(records) < max_steps:
        done, record = clock.step(generator.step)
        finished += done
        records.append(record)
    unfinished = [request_id for request_id in ids if request_id not in {i.request_id for i in finished}]
    if unfinished:
        generator.abort(unfinished)
        while generator.llm.llm_engine.has_unfinished_requests():  # drain the aborts, unprofiled
            generator.step()
    steady = [record for record in records if record.admitted == 0]
    row = {
        "scenario": scenario.name,
        "label": scenario.label,
        "model": scenario.model.name,
        "window": scenario.window,
        "cfg_scale": scenario.request_kwargs()["cfg_scale"],
        "in_flight": scenario.in_flight,
        "request_kwargs": kwargs,
        "images_finished": len(finished),
        "complete": not unfinished,
        "passes_per_image": [image.passes for image in finished],
        "all_steps": summarize(records),
        "steady_steps": summarize(steady),
    }
    mean = row["steady_steps"] or row["all_steps"]
    print(
        f"[profile] {scenario.name:34s} {mean['steps']:5d} steps {mean['ms_per_step']:8.2f} ms/step "
        f"{mean['tokens_per_step']:6.1f} tok {mean['cells_per_step']:6.1f} cells "
        f"{mean['ms_per_token']:6.3f} ms/tok  "
        + " ".join(f"{p[:5]} {mean['phases_ms_per_step'][p]:.2f}" for p in PHASES),
        flush=True,
    )
    return row


def warm_up(generator, chosen: list[Scenario], steps: int = 8) -> None:
    """A few unprofiled steps of every chosen kind of request together: first-step allocations, the masked
    kernel's build and load, kernel selection."""
    kinds = {(s.window, s.guided): s for s in chosen}.values()
    ids = [f"warm-up#{i}" for i in range(len(kinds))]
    for request_id, scenario in zip(ids, kinds, strict=True):
        generator.add_request(request_id, scenario.model.prompt, seed=0, **scenario.request_kwargs())
    for _ in range(steps):
        generator.step()
    generator.abort(ids)
    while generator.llm.llm_engine.has_unfinished_requests():
        generator.step()


def summarize(records: list[StepRecord]) -> dict[str, Any] | None:
    if not records:
        return None
    steps = len(records)
    tokens = sum(r.tokens for r in records)
    cells = sum(r.cells for r in records)
    total = sum(r.total_s for r in records)
    phases = {p: 1e3 * sum(r.phases[p] for r in records) / steps for p in PHASES}
    details = sorted({name for r in records for name in r.details})
    return {
        "steps": steps,
        "tokens_per_step": tokens / steps,
        "cells_per_step": cells / steps,
        "requests_per_step": sum(r.requests for r in records) / steps,
        "ms_per_step": 1e3 * total / steps,
        "phases_ms_per_step": phases,
        # Inclusive time of single functions (these overlap their phases; not additive).
        "details_ms_per_step": {
            n: 1e3 * sum(r.details.get(n, 0.0) for r in records) / steps for n in details
        },
        "ms_per_token": 1e3 * total / max(tokens, 1),
        "ms_per_cell": 1e3 * total / max(cells, 1),
        "phases_ms_per_token": {p: phases[p] * steps / max(tokens, 1) for p in PHASES},
        "max_phase_sum_over_total": max(sum(r.phases.values()) / r.total_s for r in records),
    }


def plot(name: str, rows: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["label"] for row in rows]
    means = [row["steady_steps"] or row["all_steps"] for row in rows]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.45 * len(rows) + 2.4), sharey=True)
    for ax, key, title in (
        (axes[0], "phases_ms_per_step", "ms per step (steady steps)"),
        (axes[1], "phases_ms_per_token", "ms per scheduled token"),
    ):
        left = [0.0] * len(rows)
        for phase, colour in zip(PHASES, COLOURS, strict=True):
            values = [mean[key][phase] for mean in means]
            ax.barh(labels, values, left=left, color=colour, label=phase)
            left = [a + b for a, b in zip(left, values, strict=True)]
        for y, (x, mean) in enumerate(zip(left, means, strict=True)):
            note = f"{x:.3f}" if key == "phases_ms_per_token" else f"{x:.1f}"
            note += (
                f"  ({mean['tokens_per_step']:.0f} tok, {mean['cells_per_step']:.0f} cells)"
                if key == "phases_ms_per_step"
                else ""
            )
            ax.text(x, y, " " + note, va="center", fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    axes[0].invert_yaxis()  # the first scenario on top (the axes share y: once)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(PHASES), fontsize=8)
    fig.suptitle("Where a step's time goes (vLLM engine in-process, CPU)", fontsize=11)
    fig.tight_layout()
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    path = common.RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": the legend below the axes
    plt.close(fig)
    return path


def scenarios(specs: list[ModelSpec], in_flight: list[int], patterns: list[str]) -> list[Scenario]:
    every = [
        Scenario(spec, window, guided, n)
        for spec in specs
        for window, guided, n in itertools.product((None, spec.window), (False, True), in_flight)
    ]
    chosen = [s for s in every if any(fnmatch.fnmatch(s.name, pattern) for pattern in patterns)]
    if not chosen:
        names = "\n  ".join(s.name for s in every)
        raise SystemExit(f"no scenario matches {patterns}; the scenarios are:\n  {names}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 and 2 in flight, a few steps")
    parser.add_argument("--scenarios", nargs="*", default=["*"], help="fnmatch patterns of scenario names")
    parser.add_argument("--max-steps", type=int, default=None, help="steps profiled per scenario (600)")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.out:
        common.RESULTS = Path(args.out)

    from vllm_zipar.serving.offline import ImageGenerator

    specs = model_specs(args.quick)
    in_flight = [1, 2] if args.quick else [1, 16]
    max_steps = args.max_steps or (4 if args.quick else 600)
    chosen = scenarios(specs, in_flight, args.scenarios)
    rows = []
    for spec in specs:
        mine = [s for s in chosen if s.model is spec]
        if not mine:
            continue
        model_dir = spec.make()
        seqs = max(s.in_flight for s in mine)
        with ImageGenerator(model_dir, max_num_seqs=seqs, **spec.engine_kwargs) as generator:
            warm_up(generator, mine)
            clock = instrument(generator)
            try:
                rows += [run_scenario(generator, clock, s, max_steps) for s in mine]
            finally:
                clock.restore()

    suffix = "_quick" if args.quick else ""
    result = {
        "phases": list(PHASES),
        "max_steps": max_steps,
        "machine": common.machine(),
        "threads": __import__("torch").get_num_threads(),
        "rows": rows,
    }
    json_path = common.write_json(f"step_profile{suffix}", result)
    png = plot(f"step_profile{suffix}", rows)
    print(f"\nwrote {json_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
