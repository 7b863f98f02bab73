"""Generate images from a running `vllm serve MODEL_DIR --decoding zipar` server with the `openai` client.

    vllm serve models/digits --decoding zipar --zipar-window 8 --port 8000 &
    python examples/generate_images.py --prompt seven --n 4 --out out/served
    python examples/generate_images.py --prompt 3 --stream --partial-images 2 --out out/served

Writes one PNG per image (and per partial image when streaming) and prints what it wrote.
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--prompt", default="seven", help="class index or class name")
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zipar-window", type=int, default=None, help="per-request window")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--partial-images", type=int, default=2)
    parser.add_argument("--out", default="out/served")
    args = parser.parse_args()

    client = OpenAI(base_url=args.url, api_key="unused")
    model = client.models.list().data[0].id
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"seed": args.seed}
    if args.zipar_window is not None:
        extra["zipar_window"] = args.zipar_window

    if args.stream:
        stream = client.images.generate(
            model=model, prompt=args.prompt, stream=True, partial_images=args.partial_images, extra_body=extra
        )
        for event in stream:
            if event.type == "image_generation.partial_image":
                path = out / f"partial_{event.partial_image_index}.png"
            else:
                path = out / "final.png"
            path.write_bytes(base64.b64decode(event.b64_json))
            print(f"{event.type}: wrote {path}")
        return

    result = client.images.generate(model=model, prompt=args.prompt, n=args.n, extra_body=extra)
    for i, item in enumerate(result.data):
        path = out / f"image_{i}.png"
        path.write_bytes(base64.b64decode(item.b64_json))
        print(f"wrote {path}")
    print(f"usage: {result.usage}")


if __name__ == "__main__":
    main()
