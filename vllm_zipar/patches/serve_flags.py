"""Lists our `vllm serve` flags (`--decoding`, `--zipar-window`) in `vllm serve --help`.

vLLM 0.32 has no hook for plugin flags on `vllm serve`. Our `vllm` console command
(`vllm_zipar.serving.vllm_command`) takes the flags out of `sys.argv` before vLLM parses them; this patch
wraps `vllm.entrypoints.cli.serve.ServeSubcommand.subparser_init` so the parser it returns also has a
"ZipAR" group with the two flags, which makes them visible in `--help`, `--help=zipar` and `--help=all`
(and accepted, should they ever reach vLLM's parser).
"""

from __future__ import annotations

import argparse
import functools

WRITTEN_FOR = "0.32.0"
GROUP_TITLE = "ZipAR"
# vLLM's plain `--help` lists groups with their descriptions only, so the description names the flags.
GROUP_DESCRIPTION = (
    "vllm-zipar: --decoding {zipar,ntp} [--zipar-window N] serves an image model directory (any family "
    "vllm-zipar registers) with ZipAR parallel decoding and POST /v1/images/generations "
    "(details: --help=zipar)"
)


def add_zipar_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group(GROUP_TITLE, GROUP_DESCRIPTION)
    group.add_argument(
        "--decoding",
        choices=["zipar", "ntp"],
        default=None,
        help="Serve MODEL_DIR (an image model directory of any family vllm-zipar registers) as an image "
        "model: sets the engine arguments it needs (our scheduler and worker, dtype float32 on the CPU / "
        "bfloat16 on CUDA, ...) unless given (--hf-overrides is merged with the model's), and enables "
        "POST /v1/images/generations. The engine's default decoding; requests may override it.",
    )
    group.add_argument(
        "--zipar-window",
        type=int,
        default=None,
        help="ZipAR window (int >= 1; default 8): columns of a row decoded before the next row starts. "
        "Implies --decoding zipar.",
    )
    group.add_argument(
        "--zipar-drafts",
        type=int,
        default=None,
        help="Exact drafts (int >= 0; default 0): guesses each row feeds per pass; the same tokens in fewer "
        "passes (docs/exact_drafts.md). Requests may override it with zipar_drafts.",
    )
    group.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="Seconds SIGTERM lets the images in flight finish (default 20); new image requests get 503 "
        "with Retry-After meanwhile, and whatever is left then fails with a 503 body.",
    )
    group.add_argument(
        "--max-request-bytes",
        type=int,
        default=None,
        help="Largest body of POST /v1/images/generations (default 65536); larger ones get 413.",
    )
    group.add_argument(
        "--request-body-timeout",
        type=float,
        default=None,
        help="Seconds a client may take to send its request body (default 10); then 408.",
    )
    group.add_argument(
        "--max-header-bytes",
        type=int,
        default=None,
        help="Largest request head (request line and headers) any route accepts (default 32768); larger "
        "ones get 431 and the connection closes. The header count is bounded by --h11-max-header-count, "
        "for httptools as for h11.",
    )
    group.add_argument(
        "--request-header-timeout",
        type=float,
        default=None,
        help="Seconds a connection may take to send a complete request head, from its opening or from the "
        "first byte of a later request (default 10); then it is closed (408 if part of a head came). "
        "Idle keep-alive connections keep vLLM's keep-alive timeout.",
    )
    return group


def apply() -> None:
    from vllm_zipar.patches import check_vllm_version

    check_vllm_version(__name__, WRITTEN_FOR)
    from vllm.entrypoints.cli.serve import ServeSubcommand

    original = ServeSubcommand.subparser_init
    if getattr(original, "_vllm_zipar_patched", False):
        return

    @functools.wraps(original)
    def subparser_init(self, subparsers):
        parser = original(self, subparsers)
        add_zipar_arguments(parser)
        return parser

    subparser_init._vllm_zipar_patched = True  # type: ignore[attr-defined]
    ServeSubcommand.subparser_init = subparser_init
