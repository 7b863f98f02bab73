"""`vllm-zipar` command line: prepare model directories, run the offline demo, animate NTP vs ZipAR."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# A small random model in the authors' formats: the demo's stand-in until a trained demo model ships.
RANDOM_DEMO_MODEL = {
    "dim": 128,
    "n_layer": 2,
    "n_head": 4,
    "codebook_size": 1024,
    "num_classes": 10,
    "grid_size": 16,
    "multiple_of": 64,
    "vq_config": {
        "codebook_size": 1024,
        "codebook_embed_dim": 8,
        "ch": 32,
        "z_channels": 64,
        "encoder_ch_mult": [1, 1, 2, 2, 4],
        "decoder_ch_mult": [1, 1, 2, 2, 4],
    },
}


def cmd_init_model(args: argparse.Namespace) -> int:
    config = _init(args)
    print(
        f"wrote {Path(args.model_dir) / 'config.json'}: {config.gpt_model or 'custom'} GPT, "
        f"{config.grid_size}x{config.grid_size} grid, {config.num_classes} classes"
    )
    return 0


def _init(args: argparse.Namespace):
    from vllm_zipar.models.model_dir import init_model_dir

    return init_model_dir(
        args.model_dir,
        args.gpt,
        args.vq,
        image_size=args.image_size,
        downsample=args.downsample,
        gpt_model=args.gpt_model,
        **{name: value for name in ("n_head", "n_kv_head") if (value := getattr(args, name)) is not None},
    )


def cmd_write_random_model(args: argparse.Namespace) -> int:
    from vllm_zipar.testing.llamagen_dirs import write_random_model_dir

    config = write_random_model_dir(args.model_dir, seed=args.seed, **RANDOM_DEMO_MODEL)
    print(f"wrote a random model ({config.grid_size}x{config.grid_size} grid) to {args.model_dir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.serve:
        from vllm_zipar.serving.demo import run_served_demo

        run_served_demo(Path(args.model), Path(args.out), num_classes=args.num_classes, seed=args.seed)
        return 0
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm_zipar.serving.demo import run_demo

    run_demo(Path(args.model), Path(args.out), num_classes=args.num_classes, seed=args.seed)
    return 0


def cmd_animate(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm_zipar.serving.animation import animate

    passes = animate(Path(args.model), Path(args.out), prompt=args.prompt, window=args.window, seed=args.seed)
    print(f"wrote {args.out}: " + ", ".join(f"{name} {count} passes" for name, count in passes.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-zipar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-model", help="write config.json for the authors' GPT and VQ .pt files")
    p.add_argument("model_dir", help="directory holding both files; config.json is written there")
    p.add_argument(
        "--gpt", required=True, help="GPT checkpoint file name inside model_dir (e.g. c2i_B_256.pt)"
    )
    p.add_argument(
        "--vq", required=True, help="VQ checkpoint file name inside model_dir (e.g. vq_ds16_c2i.pt)"
    )
    p.add_argument("--image-size", type=int, required=True, help="image side in pixels (256 or 384)")
    p.add_argument("--downsample", type=int, default=16, help="VQ downsampling factor (16 for VQ-16)")
    p.add_argument(
        "--gpt-model", default=None, help="authors' preset (GPT-B, GPT-L, ...); inferred if omitted"
    )
    p.add_argument(
        "--n-head",
        type=int,
        default=None,
        help="attention heads of a custom GPT (not one of the presets); width, depth, vocabulary and "
        "classes are read from the weights",
    )
    p.add_argument(
        "--n-kv-head", type=int, default=None, help="key/value heads of a custom GPT (default: n-head)"
    )
    p.set_defaults(func=cmd_init_model)

    p = sub.add_parser("write-random-model", help="write a small random model in the authors' formats")
    p.add_argument("model_dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_write_random_model)

    p = sub.add_parser("demo", help="generate one image per class with vLLM and write a labelled grid PNG")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--out", default="out/demo.png")
    p.add_argument("--num-classes", type=int, default=8, help="how many classes to draw (from 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--serve", action="store_true", help="start `vllm serve` and ask its /v1/images/generations route"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("animate", help="animated WebP/GIF of NTP beside ZipAR decoding one image, per pass")
    p.add_argument("--model", default="models/digits", help="model directory")
    p.add_argument("--out", default="out/ntp_vs_zipar.webp", help=".webp or .gif")
    p.add_argument("--prompt", default="seven", help="class name or index")
    p.add_argument("--window", type=int, default=4, help="ZipAR window")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_animate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        code = args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"vllm-zipar: error: {err}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - start:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
