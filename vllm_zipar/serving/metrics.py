"""Prometheus metrics of decoded images, in the process that serves vLLM's `/metrics`.

The engine core reports each finished image's decoding (passes, cells per pass) on its request output;
the front-end (offline generator or HTTP route) records it here. Names carry vLLM's `vllm:` prefix so
`LLM.get_metrics()` and vLLM's `/metrics` show them next to vLLM's own. vLLM unregisters every `vllm:`
collector when it sets up its own loggers, so ours are (re-)registered on use, keeping their counts.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Histogram

from vllm_zipar.zipar.image_stats import ImageStats

IMAGES = Counter("vllm:zipar_images", "Images generated, by decoding mode.", ["decoding"], registry=None)
PASSES_PER_IMAGE = Histogram(
    "vllm:zipar_forward_passes_per_image",
    "Engine forward passes one image took, prefill included.",
    ["decoding"],
    buckets=(16, 32, 64, 128, 224, 256, 312, 400, 512, 576, 1024, 2048, 4096, 8100),
    registry=None,
)
CELLS_PER_PASS = Histogram(
    "vllm:zipar_grid_cells_per_pass",
    "Grid cells of one image sampled in one forward pass.",
    ["decoding"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
    registry=None,
)
# Exact drafts (docs/exact_drafts.md; conditional stream): what the drafts cost and how many were right.
# With drafts, `CELLS_PER_PASS` counts the cells whose value became final in the pass.
FED_TOKENS = Counter(
    "vllm:zipar_draft_images_fed_tokens",
    "Tokens fed after the prefill by images decoded with drafts.",
    ["decoding"],
    registry=None,
)
DRAFT_TOKENS = Counter("vllm:zipar_draft_tokens", "Guessed tokens fed (drafts).", ["decoding"], registry=None)
ACCEPTED_DRAFTS = Counter(
    "vllm:zipar_draft_tokens_accepted", "Drafts whose value turned out final.", ["decoding"], registry=None
)
SUPERSEDED = Counter(
    "vllm:zipar_superseded_kv_slots",
    "KV slots of tokens a later token at the same position replaced.",
    ["decoding"],
    registry=None,
)
COLLECTORS = (IMAGES, PASSES_PER_IMAGE, CELLS_PER_PASS, FED_TOKENS, DRAFT_TOKENS, ACCEPTED_DRAFTS, SUPERSEDED)


def ensure_registered() -> None:
    registered = set(REGISTRY._collector_to_names)  # noqa: SLF001 (prometheus_client has no public lookup)
    for collector in COLLECTORS:
        if collector not in registered:
            REGISTRY.register(collector)


def record_image(stats: ImageStats) -> None:
    """Record one finished image from the stats its request output carries."""
    ensure_registered()
    label = stats.decoding
    IMAGES.labels(label).inc()
    PASSES_PER_IMAGE.labels(label).observe(float(stats.passes))
    histogram = CELLS_PER_PASS.labels(label)
    for cells in stats.cells_per_pass:
        histogram.observe(cells)
    if stats.drafts:
        FED_TOKENS.labels(label).inc(stats.fed)
        DRAFT_TOKENS.labels(label).inc(stats.draft_tokens)
        ACCEPTED_DRAFTS.labels(label).inc(stats.accepted)
        SUPERSEDED.labels(label).inc(stats.superseded)
