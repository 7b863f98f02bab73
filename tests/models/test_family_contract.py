"""Every family in the registry keeps the interface's promises, checked on a tiny directory of its own format.

Parametrised over `models/registry.IMAGE_MODELS`: a family added there gets these checks for free once it
gives a tiny-directory writer (`vllm_zipar/testing/tiny_dirs.py`). No engine runs: the adapter loads from the
directory, its sizes, grids, layouts, visual tokens, prompts, sampling defaults and decoder are checked
against each other, and `max_model_len()` against the longest request the front-end can build.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vllm_zipar.engine.request_config import Guidance, ImageDecoding
from vllm_zipar.models.image_decoder import ImageDecoder
from vllm_zipar.models.image_grid import ImageGrid, VisualTokens
from vllm_zipar.models.image_prompts import ImagePrompts, ImageSize, SamplingDefaults
from vllm_zipar.models.prompt_error import PromptError
from vllm_zipar.models.registry import IMAGE_MODELS, load_image_model
from vllm_zipar.testing.tiny_dirs import TINY_DIR_WRITERS, write_tiny_dir

FAMILIES = sorted(IMAGE_MODELS)
PROMPTS = {"class": 0, "text": "a red cat"}


def test_every_registered_family_has_a_tiny_directory_writer():
    assert sorted(TINY_DIR_WRITERS) == FAMILIES


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    model_dir = write_tiny_dir(request.param, tmp_path_factory.mktemp(request.param) / "tiny", seed=0)
    return load_image_model(model_dir)


def prompt_of(model) -> str | int:
    return PROMPTS[model.prompt_kind]


def test_the_adapter_loads_and_implements_both_views(family):
    assert isinstance(family, ImageGrid) and isinstance(family, ImagePrompts)
    assert isinstance(family.family, str) and family.family
    assert family.prompt_kind in PROMPTS


def test_sizes_are_consistent_with_their_grids(family):
    sizes = family.sizes()
    assert sizes and all(isinstance(size, ImageSize) for size in sizes)
    assert len({size.name for size in sizes}) == len(sizes)
    assert family.native_size == sizes[0] == family.size(None) == family.size("auto")
    for size in sizes:
        rows, cols = size.grid
        assert rows >= 1 and cols >= 1
        # One pixel patch per token, the same for every size.
        assert size.width % cols == 0 and size.height % rows == 0
        assert size.width // cols == size.height // rows == sizes[0].width // sizes[0].grid[1]
        assert family.size(size.name) == size
    with pytest.raises(ValueError, match="is not supported by this model"):
        family.size("3x5")
    assert family.default_grid in {size.grid for size in sizes}


def test_layout_of_each_size(family):
    eol = family.eol_token
    assert eol is None or 0 <= eol < family.input_vocab_size
    for size in family.sizes():
        layout = family.layout(5, size.grid)
        assert (layout.prompt_len, layout.height, layout.width) == (5, *size.grid)
        assert layout.eol == (eol is not None) and layout.eol_token == eol
    assert (family.layout(3).height, family.layout(3).width) == family.default_grid


def test_check_grid_takes_every_size_and_refuses_a_wrong_one(family):
    for size in family.sizes():
        family.check_grid(size.grid)
    with pytest.raises(ValueError, match="4096x4095"):
        family.check_grid((4096, 4095))


def test_visual_logits_and_the_id_code_map_round_trip_inside_the_vocabulary(family):
    visual = family.visual_tokens
    assert isinstance(visual, VisualTokens)
    assert visual.count >= 2 and len(visual.logits) == len(visual.ids) == visual.count
    assert 0 <= min(visual.ids) and max(visual.ids) < family.input_vocab_size
    codes = torch.arange(visual.count)
    ids = visual.code_to_id(codes)
    assert ids.tolist() == list(visual.ids)
    assert torch.equal(visual.id_to_code(ids), codes)
    # Logits column c scores code c: a one-hot row at column logits[c] selects code c.
    width = max(visual.logits) + 1
    rows = torch.zeros(visual.count, width)
    rows[codes, torch.tensor(list(visual.logits))] = 1.0
    assert torch.equal(visual.visual_logits(rows).argmax(-1), codes)
    outside = next(i for i in range(family.input_vocab_size + 1) if i not in set(visual.ids))
    with pytest.raises(ValueError, match="not visual tokens"):
        visual.id_to_code(torch.tensor([outside]))


def check_ids(family, ids) -> None:
    assert ids and all(type(i) is int for i in ids), ids
    assert all(0 <= i < family.input_vocab_size for i in ids), ids
    assert not set(ids) & set(family.visual_tokens.ids)


def test_prompt_ids_are_ints_within_the_vocabulary(family):
    for size in family.sizes():
        check_ids(family, family.prompt_ids(prompt_of(family), size))
    with pytest.raises(PromptError):
        family.prompt_ids(" " if family.prompt_kind == "text" else "no such class", family.native_size)


def test_unconditional_prompt_ids(family):
    size = family.native_size
    cond = family.prompt_ids(prompt_of(family), size)
    check_ids(family, family.unconditional_prompt_ids(None, size, cond))
    if family.takes_negative_prompt:
        check_ids(family, family.unconditional_prompt_ids("a blurry picture", size, cond))
    else:
        with pytest.raises(PromptError) as refused:
            family.unconditional_prompt_ids("a blurry picture", size, cond)
        assert refused.value.param == "negative_prompt"


def test_class_fields_match_the_prompt_kind(family):
    if family.prompt_kind == "class":
        assert type(family.num_classes) is int and family.num_classes >= 1
        names = family.class_names
        assert names is None or (len(names) == family.num_classes and all(isinstance(n, str) for n in names))
        family.prompt_ids(family.num_classes - 1, family.native_size)
    else:
        assert family.num_classes is None and family.class_names is None


def test_sampling_defaults_are_typed(family):
    defaults = family.sampling_defaults
    assert isinstance(defaults, SamplingDefaults)
    for field in dataclasses.fields(defaults):
        value = getattr(defaults, field.name)
        assert type(value) is {"int": int, "float": float}[field.type], (field.name, value)
    assert defaults.cfg_scale >= 1.0 and defaults.cfg_interval >= -1
    assert defaults.temperature >= 0 and defaults.top_k >= 0 and 0 < defaults.top_p <= 1
    assert SamplingDefaults.from_dict(defaults.to_dict()) == defaults


def test_the_decoder_turns_random_grids_into_images_of_each_size(family):
    decoder = family.load_decoder()
    assert isinstance(decoder, ImageDecoder)
    decoder = decoder.to("cpu")
    visual = family.visual_tokens
    generator = torch.Generator().manual_seed(0)
    for size in family.sizes():
        codes = torch.randint(0, visual.count, (2, *size.grid), generator=generator)
        with torch.inference_mode():
            images = decoder.to_pil_images(visual.code_to_id(codes))
        assert [image.size for image in images] == [(size.width, size.height)] * 2
        assert all(image.mode == "RGB" for image in images)


def test_max_model_len_holds_both_guided_streams_of_the_largest_grid(family):
    assert family.engine_args()["max_model_len"] == family.max_model_len()
    needed = 0
    for size in family.sizes():
        cond = family.prompt_ids(prompt_of(family), size)
        uncond = family.unconditional_prompt_ids(None, size, cond)
        layout = family.layout(len(cond), size.grid)
        for decoding in (ImageDecoding.parse("ntp", None), ImageDecoding.parse("zipar", 1)):
            guided = decoding.with_guidance(Guidance(2.0, len(uncond)))
            # The KV sequence: both prompts, then every input fed after them (the last cells are not fed).
            needed = max(needed, len(cond) + len(uncond) + guided.num_output_tokens(layout))
    assert family.max_model_len() >= needed
