"""Prometheus metrics of the HTTP image route: requests accepted, images served and seconds per image.

Registered like `metrics.py`'s (vLLM unregisters every `vllm:` collector when its loggers start, so they are
registered again on use) and shown on vLLM's `/metrics` next to `vllm:zipar_*` pass statistics.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Histogram

from vllm_zipar.zipar.image_stats import ImageStats

REQUESTS_ACCEPTED = Counter(
    "vllm:zipar_image_requests_accepted",
    "Requests to POST /v1/images/generations that passed validation; their images go to the engine.",
    registry=None,
)
IMAGES_SERVED = Counter(
    "vllm:zipar_images_served", "Images returned by POST /v1/images/generations.", ["decoding"], registry=None
)
SECONDS_PER_IMAGE = Histogram(
    "vllm:zipar_seconds_per_image",
    "Seconds from submitting an image to the engine until its last token (queueing included).",
    ["decoding"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=None,
)
COLLECTORS = (REQUESTS_ACCEPTED, IMAGES_SERVED, SECONDS_PER_IMAGE)


def ensure_route_metrics() -> None:
    registered = set(REGISTRY._collector_to_names)  # noqa: SLF001 (prometheus_client has no public lookup)
    for collector in COLLECTORS:
        if collector not in registered:
            REGISTRY.register(collector)


def record_served(stats: ImageStats, seconds: float) -> None:
    ensure_route_metrics()
    label = stats.decoding
    IMAGES_SERVED.labels(label).inc()
    SECONDS_PER_IMAGE.labels(label).observe(seconds)


def record_accepted() -> None:
    ensure_route_metrics()
    REQUESTS_ACCEPTED.inc()
