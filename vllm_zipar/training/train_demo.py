"""``python -m vllm_zipar.training.train_demo``: train and write the shipped demo model, ``models/digits/``.

One entry point for ``make train-demo``: VQ tokenizer, then the LlamaGen c2i GPT on its codes, then the digit
classifier used to score samples. Writes, in the authors' formats, ``vq.pt`` and ``gpt.pt``, then
``config.json`` (``save_config``, with ``vq_config``), ``classifier.pt``, ``train_log.json`` (losses, held-out
numbers, wall times) and ``samples.png`` (NTP samples from the training-side sampler, one row per class).
Every random draw is seeded, so a rerun on the same machine and thread count reproduces the files.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vllm_zipar.models.model_dir import save_config
from vllm_zipar.training import classifier as clf
from vllm_zipar.training.data import IMAGE_SIZE, NUM_CLASSES, load_digit_splits
from vllm_zipar.training.train_gpt import (
    align_cca,
    bf16_available,
    demo_gpt_config,
    evaluate_gpt,
    save_gpt,
    shifted_codes,
    train_gpt,
)
from vllm_zipar.training.train_vq import (
    demo_vq_config,
    encode_split,
    evaluate_vq,
    save_vq_checkpoint,
    train_vq,
    vq_config_dict,
)

MAX_SHIPPED_BYTES = 20 << 20
# The GPT as the authors' recipe trains it (before alignment), kept for CFG once the engine has it.
BASE_GPT = "gpt_base.pt"
# Sampling defaults written to config.json ("sampling_defaults"; the engine's and benchmarks/quality.py's
# defaults for this model) and used by the preview; --cfg-scale, --temperature, --top-k, --top-p change them.
SAMPLING_DEFAULTS = {"cfg_scale": 1.3, "cfg_interval": -1, "temperature": 0.3, "top_k": 0, "top_p": 1.0}


def sample_sheet(rows: list[list[Image.Image]], row_labels: list[str], scale: int = 2) -> Image.Image:
    """One row of images per label, enlarged ``scale`` times, with the label at the left."""
    width, height = rows[0][0].size
    width, height = width * scale, height * scale
    margin = 18
    columns = max(len(row) for row in rows)
    sheet = Image.new("RGB", (margin + columns * width, len(rows) * height), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (row, label) in enumerate(zip(rows, row_labels, strict=True)):
        draw.text((3, r * height + height // 2 - 5), label, fill="black")
        for c, image in enumerate(row):
            sheet.paste(image.resize((width, height), Image.NEAREST), (margin + c * width, r * height))
    return sheet


def load_base(out: Path):
    """The stages a previous run wrote to ``out``: VQ, config, base GPT, classifier and its log."""
    from vllm_zipar.models.llamagen_checkpoint import check_gpt_state_dict, load_gpt_state_dict
    from vllm_zipar.models.vq.llamagen_vq import load_llamagen_vq
    from vllm_zipar.training.gpt import LlamaGenC2I

    log = json.loads((out / "train_log.json").read_text())
    vq = load_llamagen_vq(out / "vq.pt", demo_vq_config())
    config = demo_gpt_config(vq_config_dict(vq.config), grid_size=16, downsample=vq.config.downsample)
    state = load_gpt_state_dict(out / BASE_GPT)
    check_gpt_state_dict(state, config, out / BASE_GPT)
    gpt = LlamaGenC2I(config)
    gpt.load_state_dict(state, strict=True)
    return vq, config, gpt.eval(), clf.load_classifier(out / "classifier.pt"), log


def directory_bytes(model_dir: Path) -> int:
    return sum(path.stat().st_size for path in model_dir.iterdir() if path.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models/digits", help="model directory to write")
    parser.add_argument("--vq-steps", type=int, default=600)
    parser.add_argument("--gpt-steps", type=int, default=2000)
    parser.add_argument("--classifier-steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=32, help="VQ and GPT batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default, all cores)"
    )
    parser.add_argument(
        "--cca-steps",
        type=int,
        nargs="+",
        default=[600, 400],
        help="guidance-free alignment: steps of each round (0: none); every round restarts the optimiser "
        "and aligns against the base GPT",
    )
    parser.add_argument("--cca-lr", type=float, default=1e-4)
    parser.add_argument("--cca-lambda", type=float, default=1.0)
    parser.add_argument(
        "--resume-base",
        action="store_true",
        help="reuse vq.pt, gpt_base.pt, classifier.pt and train_log.json already in --out; run the alignment",
    )
    parser.add_argument("--cfg-scale", type=float, default=SAMPLING_DEFAULTS["cfg_scale"])
    parser.add_argument("--temperature", type=float, default=SAMPLING_DEFAULTS["temperature"])
    parser.add_argument("--top-k", type=int, default=SAMPLING_DEFAULTS["top_k"])
    parser.add_argument("--top-p", type=float, default=SAMPLING_DEFAULTS["top_p"])
    parser.add_argument("--no-bf16", action="store_true", help="train the GPT in float32 only")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.vq_steps, args.gpt_steps, args.classifier_steps = 20, 20, 50
        args.cca_steps = [10 for _ in args.cca_steps]
    sampling = {
        **SAMPLING_DEFAULTS,
        "cfg_scale": args.cfg_scale,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
    }
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wall = {}
    t0 = time.perf_counter()

    train, heldout = load_digit_splits()
    print(
        f"[train-demo] {len(train)} training and {len(heldout)} held-out digits, "
        f"{IMAGE_SIZE}x{IMAGE_SIZE} RGB"
    )

    use_bf16 = bf16_available() and not args.no_bf16
    if args.resume_base:
        vq, config, base_gpt, classifier, log = load_base(out)
        wall = dict(log["wall_seconds"])
        codes = shifted_codes(vq, train)
    else:
        log = {}
        # 1. Tokenizer.
        t = time.perf_counter()
        vq, vq_log = train_vq(train, steps=args.vq_steps, batch_size=args.batch_size, seed=args.seed)
        vq_eval = evaluate_vq(vq, heldout)
        save_vq_checkpoint(vq, out / "vq.pt", steps=args.vq_steps, seed=args.seed, image_size=IMAGE_SIZE)
        wall["vq_s"] = round(time.perf_counter() - t, 1)
        print(f"[train-demo] VQ: held-out {vq_eval} ({wall['vq_s']} s)")

        # 2. Generator on the codes of shifted training pages.
        t = time.perf_counter()
        codes = shifted_codes(vq, train)
        heldout_codes = encode_split(vq, heldout.images)
        grid = codes.shape[-1]
        config = demo_gpt_config(vq_config_dict(vq.config), grid_size=grid, downsample=vq.config.downsample)
        gpt, gpt_log = train_gpt(
            codes,
            train.labels,
            config,
            steps=args.gpt_steps,
            batch_size=args.batch_size,
            seed=args.seed + 1,
            bf16=use_bf16,
        )
        gpt_eval = {
            "train_loss_unshifted": round(evaluate_gpt(gpt, codes[codes.shape[0] // 2], train.labels), 5),
            "heldout_loss": round(evaluate_gpt(gpt, heldout_codes, heldout.labels), 5),
        }
        save_gpt(gpt, out / BASE_GPT, config)
        base_gpt = gpt
        wall["gpt_s"] = round(time.perf_counter() - t, 1)
        print(f"[train-demo] GPT: {gpt_eval} ({wall['gpt_s']} s)")

        # 3. Classifier that scores samples (benchmarks/quality.py).
        t = time.perf_counter()
        classifier, classifier_log = clf.train_classifier(
            train, steps=args.classifier_steps, seed=args.seed + 2
        )
        heldout_accuracy = clf.accuracy(classifier, heldout)
        clf.save_classifier(classifier, out / "classifier.pt", heldout_accuracy=heldout_accuracy)
        wall["classifier_s"] = round(time.perf_counter() - t, 1)
        print(f"[train-demo] classifier: held-out accuracy {heldout_accuracy:.4f} ({wall['classifier_s']} s)")

    # 3b. Guidance-free alignment (CCA) of the base GPT; the result is the served gpt.pt.
    t = time.perf_counter()
    gpt = base_gpt
    cca_log: list[dict] = []
    cca_rounds: list[dict] = []
    for round_index, round_steps in enumerate(step for step in args.cca_steps if step > 0):
        gpt, round_log = align_cca(
            copy.deepcopy(gpt),
            codes,
            train.labels,
            steps=round_steps,
            lr=args.cca_lr,
            lam=args.cca_lambda,
            seed=args.seed + 4 + 3 * round_index,
            bf16=use_bf16,
            reference=base_gpt,
        )
        done = sum(entry["steps"] for entry in cca_rounds)
        cca_log += [{**entry, "step": entry["step"] + done, "round": round_index + 1} for entry in round_log]
        cca_rounds.append({"steps": round_steps, "final": round_log[-1]})
    config.sampling_defaults = dict(sampling)
    save_gpt(gpt, out / config.gpt_checkpoint, config)
    save_config(config, out)
    wall["cca_s"] = round(time.perf_counter() - t, 1)
    print(f"[train-demo] CCA alignment: {cca_log[-1] if cca_log else 'skipped'} ({wall['cca_s']} s)")

    # 4. A preview: 10 NTP samples per class from the training-side sampler, scored by the classifier.
    t = time.perf_counter()
    per_class = 10
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    tokens = gpt.sample(
        labels,
        temperature=sampling["temperature"],
        top_k=sampling["top_k"],
        top_p=sampling["top_p"],
        cfg_scale=sampling["cfg_scale"],
        generator=torch.Generator().manual_seed(args.seed + 3),
    )
    with torch.no_grad():
        pixels = vq.decode_codes(tokens)
    preview_accuracy = float((clf.predict(classifier, pixels) == labels).float().mean())
    images = vq.to_pil_images(tokens)
    rows = [images[c * per_class : (c + 1) * per_class] for c in range(NUM_CLASSES)]
    sample_sheet(rows, [str(c) for c in range(NUM_CLASSES)]).save(out / "samples.png")
    wall["preview_s"] = round(time.perf_counter() - t, 1)
    # On resume, the base stages' times come from the log of the run that trained them.
    wall["total_s"] = round(
        time.perf_counter()
        - t0
        + sum(v for k, v in wall.items() if args.resume_base and k in ("vq_s", "gpt_s", "classifier_s")),
        1,
    )
    print(f"[train-demo] preview: classifier accuracy of 100 samples {preview_accuracy:.2f}")

    if not args.resume_base:
        log = {
            "vq": {"final": vq_log[-1], "heldout": vq_eval, "log": vq_log},
            "gpt_base": {"final": gpt_log[-1], "eval": gpt_eval, "log": gpt_log},
            "classifier": {
                "final": classifier_log[-1],
                "heldout_accuracy": round(heldout_accuracy, 4),
                "log": classifier_log,
            },
        }
    log.update(
        {
            "settings": {
                **{k: v for k, v in vars(args).items() if k != "out"},
                "bf16_autocast": use_bf16,
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
            },
            "wall_seconds": wall,
            "cca": {"final": cca_log[-1] if cca_log else None, "rounds": cca_rounds, "log": cca_log},
            "sampling_defaults": sampling,
            "preview": {
                "samples": len(labels),
                **sampling,
                "classifier_accuracy": round(preview_accuracy, 4),
            },
        }
    )
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    size = directory_bytes(out)
    print(f"[train-demo] wrote {out}: {size / 2**20:.2f} MiB in {wall['total_s']} s")
    if size > MAX_SHIPPED_BYTES:
        raise SystemExit(f"[train-demo] {out} is {size} bytes, over the {MAX_SHIPPED_BYTES}-byte budget")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
