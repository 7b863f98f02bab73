"""Sample quality of the shipped demo model (models/digits/) through vLLM's engine, per decoding mode.

For each mode (NTP, then ZipAR at every ``--windows`` value the engine accepts) it generates ``--per-class``
images of each digit with fixed seeds through ``ImageGenerator`` (one vLLM request per image), decodes them
with the model's VQ and scores them with the shipped classifier (``models/digits/classifier.pt``):

- class accuracy: the fraction of samples the classifier reads as the digit that was asked for;
- a Fréchet distance between the classifier's 64-d penultimate features of the samples and of the real
  held-out digits. FID-like, but with this small classifier instead of Inception-v3: compare its values only
  with each other (same classifier, same held-out set), never with published FIDs. Two reference rows put it
  in scale: real training digits vs held-out (the floor for a perfect generator) and the VQ's reconstructions
  of the held-out digits (the tokenizer's own cost).

Sampling: the model directory's ``sampling_defaults`` (config.json; classifier-free guidance included)
unless ``--cfg-scale`` / ``--temperature`` / ``--top-k`` / ``--top-p`` say otherwise. Same seeds in every
mode, and seeded draws are position-keyed, so NTP and ZipAR differ only through the context each cell saw;
the script also reports the fraction of grid cells identical to NTP's. Writes
``benchmarks/results/quality.json``, ``quality.png`` (scores per mode) and ``quality_samples_<mode>.png``.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python benchmarks/quality.py [--windows 16 8 4 2 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "digits"))
    parser.add_argument("--per-class", type=int, default=50, help="samples per digit (10 digits)")
    parser.add_argument("--seed", type=int, default=1000, help="sample i uses seed SEED + i")
    parser.add_argument("--cfg-scale", type=float, default=None, help="default: the model's")
    parser.add_argument("--temperature", type=float, default=None, help="default: the model's")
    parser.add_argument("--top-k", type=int, default=None, help="0 disables top-k; default: the model's")
    parser.add_argument("--top-p", type=float, default=None, help="default: the model's")
    parser.add_argument(
        "--windows",
        type=int,
        nargs="*",
        default=[16, 8, 4, 2, 1],
        help="ZipAR windows to score besides NTP (default W, W/2, 4, 2, 1 of the 16-wide demo grid)",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    parser.add_argument("--kv-cache-mib", type=int, default=256, help="vLLM KV cache size on CPU")
    return parser.parse_args(argv)


def sampling(args, defaults) -> dict:
    """The sampling every mode uses: the command line over the model's `SamplingDefaults`."""
    chosen = {name: getattr(args, name) for name in ("cfg_scale", "temperature", "top_k", "top_p")}
    return {name: getattr(defaults, name) if value is None else value for name, value in chosen.items()}


def generate(generator, labels, seeds, sampled: dict, mode: dict) -> torch.Tensor:
    """Token grids [N, H, W] for one mode; raises if the engine refuses the mode."""
    results = generator.generate(
        labels, seeds=seeds, decoding=mode["decoding"], zipar_window=mode["window"], **sampled
    )
    return torch.stack([r.tokens for r in results])


def sheet(images, per_row: int):
    from vllm_zipar.training.train_demo import sample_sheet

    rows = [images[i : i + per_row] for i in range(0, len(images), per_row)]
    return sample_sheet(rows, [str(r) for r in range(len(rows))])


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[quality] matplotlib not installed (pip install -e '.[demo]'): no plot")
        return False
    modes = [m for m in results["modes"] if "accuracy" in m]
    names = [
        m["name"].replace("ZipAR ", "") + (f"\n{m['passes_per_image']}" if "passes_per_image" in m else "")
        for m in modes
    ]
    refs = results["reference"]
    fig, (ax_acc, ax_fd) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_acc.bar(names, [100 * m["accuracy"] for m in modes], color="tab:blue")
    ax_acc.axhline(100 * refs["real_heldout_accuracy"], color="gray", ls="--", label="real held-out digits")
    ax_acc.set_ylabel("classifier accuracy (%)")
    ax_acc.set_ylim(0, 105)
    ax_acc.legend(loc="lower right")
    ax_fd.bar(names, [m["frechet_distance"] for m in modes], color="tab:orange")
    ax_fd.axhline(refs["frechet_train_vs_heldout"], color="gray", ls="--", label="real train vs held-out")
    ax_fd.axhline(refs["frechet_vq_reconstruction"], color="black", ls=":", label="VQ reconstructions")
    ax_fd.set_ylabel("Fréchet distance (classifier features)")
    for ax in (ax_acc, ax_fd):
        ax.set_xlabel("decoding (forward passes per image)")
    ax_fd.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.suptitle(
        f"demo model samples, {results['samples_per_mode']} per mode, "
        f"CFG {results['sampling']['cfg_scale']:g}, T={results['sampling']['temperature']}, "
        f"top-k={results['sampling']['top_k']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from vllm_zipar.models.vq.llamagen_vq import LlamaGenVQConfig, load_llamagen_vq
    from vllm_zipar.serving.offline import ImageGenerator
    from vllm_zipar.training import classifier as clf
    from vllm_zipar.training.data import NUM_CLASSES, load_digit_splits

    model_dir = Path(args.model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    classifier = clf.load_classifier(model_dir / "classifier.pt")
    train, heldout = load_digit_splits()
    real_features = clf.features(classifier, heldout.images)

    start = time.perf_counter()
    generator = ImageGenerator(model_dir, kv_cache_memory_bytes=args.kv_cache_mib << 20)
    engine_start_s = time.perf_counter() - start
    sampled = sampling(args, generator.model.sampling_defaults)
    print(f"[quality] sampling: {sampled}")
    vq = load_llamagen_vq(
        model_dir / generator.config.vq_checkpoint, LlamaGenVQConfig(**generator.config.vq_config)
    )
    with torch.no_grad():
        reconstructions = vq.decode_codes(vq.encode(heldout.images))
    reference = {
        "real_heldout_accuracy": clf.accuracy(classifier, heldout),
        "frechet_train_vs_heldout": clf.frechet_distance(
            clf.features(classifier, train.images), real_features
        ),
        "frechet_vq_reconstruction": clf.frechet_distance(
            clf.features(classifier, reconstructions), real_features
        ),
        "vq_reconstruction_accuracy": float(
            (clf.predict(classifier, reconstructions) == heldout.labels).float().mean()
        ),
    }
    print(f"[quality] reference: {json.dumps({k: round(v, 4) for k, v in reference.items()})}")

    labels = [c for c in range(NUM_CLASSES) for _ in range(args.per_class)]
    seeds = [args.seed + i for i in range(len(labels))]
    label_t = torch.tensor(labels)
    modes = [{"name": "NTP", "decoding": "ntp", "window": None}]
    modes += [{"name": f"ZipAR w={w}", "decoding": "zipar", "window": w} for w in args.windows]
    ntp_tokens = None
    rows = []
    for mode in modes:
        entry = dict(mode)
        t = time.perf_counter()
        try:
            tokens = generate(generator, labels, seeds, sampled, mode)
        except (NotImplementedError, ValueError, TypeError, KeyError, RuntimeError) as error:
            entry["skipped"] = f"{type(error).__name__}: {error}"
            print(f"[quality] {mode['name']}: skipped, the engine does not take it ({entry['skipped']})")
            rows.append(entry)
            continue
        entry["generate_s"] = round(time.perf_counter() - t, 2)
        entry["passes_per_image"] = generator.generate(
            [0], seeds=[0], decoding=mode["decoding"], zipar_window=mode["window"], **sampled
        )[0].passes
        with torch.no_grad():
            pixels = vq.decode_codes(tokens)
        predicted = clf.predict(classifier, pixels)
        correct = predicted == label_t
        entry["accuracy"] = float(correct.float().mean())
        entry["per_class_accuracy"] = [
            round(float(correct[label_t == c].float().mean()), 3) for c in range(NUM_CLASSES)
        ]
        entry["frechet_distance"] = clf.frechet_distance(clf.features(classifier, pixels), real_features)
        entry["distinct_images"] = len({tuple(g.flatten().tolist()) for g in tokens})
        if ntp_tokens is None:
            ntp_tokens = tokens
        else:
            entry["cells_equal_to_ntp"] = float((tokens == ntp_tokens).float().mean())
        name = mode["name"].lower().replace(" ", "").replace("=", "")
        shown = [vq.to_pil_images(tokens[label_t == c][:10]) for c in range(NUM_CLASSES)]
        sheet([img for row in shown for img in row], per_row=10).save(
            out.parent / f"quality_samples_{name}.png"
        )
        print(
            f"[quality] {mode['name']}: accuracy {entry['accuracy']:.3f}, "
            f"Fréchet {entry['frechet_distance']:.2f}, "
            f"{len(labels)} images in {entry['generate_s']} s"
        )
        rows.append(entry)

    results = {
        "model": str(model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir),
        "samples_per_mode": len(labels),
        "seeds": f"{args.seed} .. {args.seed + len(labels) - 1} (sample i: class i // {args.per_class})",
        "sampling": sampled,
        "metric_note": (
            "Fréchet distance of the digit classifier's 64-d penultimate features vs real held-out digits: "
            "FID-like, not comparable to Inception FID"
        ),
        "reference": reference,
        "modes": rows,
        "engine_start_s": round(engine_start_s, 1),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
        },
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    out.write_text(json.dumps(results, indent=1) + "\n")
    plotted = plot(results, out.with_suffix(".png"))
    print(f"[quality] wrote {out}" + (f" and {out.with_suffix('.png')}" if plotted else ""))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())
