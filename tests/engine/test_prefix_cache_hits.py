"""Prefix-cache hits never cover a token whose logits an image's pass samples.

A guided image's conditional stream ends mid-prompt (the unconditional prompt follows it), so vLLM's own rule
(keep the prompt's last token out of a hit) is not enough: a second request with the same prompts took the
conditional prompt's last token from the cache, had no logits row for cell (0, 0), and the scheduler's
IndexError killed the engine (issue 22: `n=2`, guidance on, Emu3's long default negative prompt). Every
image must equal the same request decoded alone, and the cache must really have been hit.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.engine.conftest import kv_cache_usage
from vllm_zipar.serving.offline import ImageGenerator
from vllm_zipar.testing.emu3_dirs import write_random_emu3_dir

pytestmark = pytest.mark.engine

BLOCK = 32
# Long enough that its conditional prompt fills a block: the cut hit still keeps that block.
PROMPT = "a red cat on a wooden table by the window in warm morning light"


def prefix_cache_hits(generator: ImageGenerator) -> int:
    for metric in generator.llm.get_metrics():
        if metric.name == "vllm:prefix_cache_hits":
            return int(metric.value)
    raise AssertionError("vLLM reported no vllm:prefix_cache_hits metric")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("emu3-prefix")
    write_random_emu3_dir(model_dir, seed=3)
    # The authors' long default negative prompt stays: the conditional prompt ends inside a full block.
    (model_dir / "zipar.json").write_text(json.dumps({"image_area": 64 * 64}))
    generator = ImageGenerator(
        model_dir, max_num_seqs=8, kv_cache_memory_bytes=4 << 20, block_size=BLOCK, disable_log_stats=False
    )
    yield generator
    generator.close()


@pytest.mark.parametrize("size", ["64x64", "88x48"])
@pytest.mark.parametrize("window", [None, 2])
def test_guided_repeats_hit_the_cache_and_equal_the_image_alone(engine, size, window):
    kwargs = dict(size=size, cfg_scale=3.0, temperature=1.0, top_k=20)
    kwargs.update({"decoding": "ntp"} if window is None else {"zipar_window": window})
    request = engine.requests.image_request(PROMPT, **kwargs)
    cond_len = len(request.prompt["prompt_token_ids"]) - request.decoding.uncond_prompt_len
    total = len(request.prompt["prompt_token_ids"])
    # vLLM's own hit would cover the conditional prompt's last token; ours stops at a block before it.
    assert BLOCK <= cond_len < (total - 1) // BLOCK * BLOCK

    alone = engine.generate([PROMPT], seeds=[5], **kwargs)[0]
    hits = prefix_cache_hits(engine)
    together = engine.generate([PROMPT, PROMPT, PROMPT], seeds=[5, 5, 6], **kwargs)
    assert prefix_cache_hits(engine) > hits
    assert torch.equal(together[0].tokens, alone.tokens)
    assert torch.equal(together[1].tokens, alone.tokens)
    assert not torch.equal(together[2].tokens, alone.tokens)
    assert together[0].stats.passes == alone.stats.passes
    assert kv_cache_usage(engine) == 0.0
