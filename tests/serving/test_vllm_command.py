"""Our `vllm` console command: `--decoding` / `--zipar-window` become engine arguments (no server here)."""

from __future__ import annotations

import json
import subprocess

import pytest

from vllm_zipar.engine import SCHEDULER_CLS, worker_cls_name
from vllm_zipar.serving.served_model import vllm_command
from vllm_zipar.serving.vllm_command import CommandError, allow_our_route, serve_argv, take_our_flags
from vllm_zipar.testing.llamagen_dirs import write_random_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cmd")
    write_random_model_dir(path, with_vq=False, dim=64, n_layer=1, n_head=2, codebook_size=64, grid_size=4)
    return str(path)


def value_of(argv, flag):
    return argv[argv.index(flag) + 1]


def test_our_flags_are_taken_out_in_every_spelling():
    rest, ours = take_our_flags(["serve", "m", "--decoding=zipar", "--zipar_window", "4", "--port", "1"])
    assert rest == ["serve", "m", "--port", "1"]
    assert ours == {"--decoding": "zipar", "--zipar-window": "4"}


def test_decoding_adds_the_engine_arguments(model_dir, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    env: dict[str, str] = {}
    argv = serve_argv(["serve", model_dir, "--decoding", "zipar", "--zipar-window", "3"], env)
    assert argv[:2] == ["serve", model_dir] and "--decoding" not in argv
    assert json.loads(value_of(argv, "--additional-config")) == {"zipar": {"decoding": "zipar", "window": 3}}
    assert value_of(argv, "--dtype") == "float32" and value_of(argv, "--scheduler-cls") == SCHEDULER_CLS
    assert value_of(argv, "--worker-cls") == worker_cls_name()
    assert "--skip-tokenizer-init" in argv and "--enforce-eager" in argv
    assert int(value_of(argv, "--max-model-len")) > 16
    assert int(value_of(argv, "--kv-cache-memory-bytes")) == 1 << 30
    assert set(env["VLLM_PLUGINS"].split(",")) >= {"vllm_zipar", "vllm_zipar_images"}


def test_user_engine_arguments_win(model_dir):
    argv = serve_argv(
        ["serve", model_dir, "--decoding", "ntp", "--dtype=float32", "--max_model_len", "99",
         "--kv-cache-memory-bytes", "5", "--no-enforce-eager"],
        {},
    )  # fmt: skip
    assert argv.count("--max_model_len") == 1 and "--max-model-len" not in argv
    assert "--dtype" not in argv and "--enforce-eager" not in argv
    assert argv.count("--kv-cache-memory-bytes") == 1
    assert json.loads(value_of(argv, "--additional-config")) == {"zipar": {"decoding": "ntp", "window": None}}


def test_without_decoding_the_command_is_vllms_own(model_dir):
    env: dict[str, str] = {}
    assert serve_argv(["serve", model_dir, "--port", "8001"], env) == ["serve", model_dir, "--port", "8001"]
    assert env == {}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--decoding", "beam"], "--decoding"),
        (["--zipar-window", "0"], "--zipar-window"),
        (["--zipar-window", "x"], "--zipar-window"),
        (["--decoding", "ntp", "--zipar-window", "4"], "--zipar-window"),
    ],
)
def test_bad_flags_are_refused_before_vllm_starts(model_dir, args, message):
    with pytest.raises(CommandError, match=message):
        serve_argv(["serve", model_dir, *args], {})


def test_a_non_model_directory_is_refused(tmp_path):
    with pytest.raises(CommandError, match="config.json"):
        serve_argv(["serve", str(tmp_path), "--decoding", "zipar"], {})


def test_the_route_is_added_to_an_existing_allow_list():
    env = {"VLLM_PLUGINS": "other"}
    allow_our_route(env)
    assert env["VLLM_PLUGINS"] == "other,vllm_zipar,vllm_zipar_images"


@pytest.mark.serving
def test_the_installed_vllm_command_is_ours_and_lists_our_flags():
    """The script scripts/install.sh left in the venv runs vLLM's CLI (its version lookup patched on the
    CPU build) with our flags in `vllm serve --help`."""
    done = subprocess.run(
        [str(vllm_command()), "serve", "--help"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    help_text = " ".join(done.stdout.split())
    assert "ZipAR vllm-zipar: --decoding {zipar,ntp} [--zipar-window N]" in help_text, done.stdout[-3000:]


def test_route_bounds_become_environment_variables(model_dir):
    env: dict[str, str] = {}
    argv = serve_argv(
        [
            "serve",
            model_dir,
            "--decoding",
            "ntp",
            "--drain-timeout",
            "5",
            "--max-request-bytes=1024",
            "--request-body-timeout",
            "2.5",
        ],
        env,
    )
    assert not any(flag in " ".join(argv) for flag in ("drain", "request-bytes", "body-timeout"))
    assert env["VLLM_ZIPAR_DRAIN_TIMEOUT"] == "5.0" and env["VLLM_ZIPAR_MAX_REQUEST_BYTES"] == "1024"
    assert env["VLLM_ZIPAR_REQUEST_BODY_TIMEOUT"] == "2.5"
    with pytest.raises(CommandError, match="--drain-timeout"):
        serve_argv(["serve", model_dir, "--decoding", "ntp", "--drain-timeout", "-1"], {})


@pytest.fixture(scope="module")
def emu3_dir(tmp_path_factory):
    """A tiny Emu3 whose family overrides `architectures` and `text_config.max_position_embeddings`."""
    from vllm_zipar.testing.emu3_dirs import write_random_emu3_dir

    path = tmp_path_factory.mktemp("cmd-emu3") / "tiny-emu3"
    write_random_emu3_dir(path, seed=0, max_position_embeddings=32)
    return str(path)


def test_user_hf_overrides_are_merged_with_the_familys(emu3_dir):
    """JSON and vLLM's dotted spelling, any spelling of the name: one merged `--hf-overrides` goes to vLLM."""
    argv = serve_argv(
        ["serve", emu3_dir, "--decoding", "ntp", "--hf-overrides", '{"text_config": {"rope_theta": 5.0}}',
         "--hf_overrides.text_config.tie_word_embeddings", "false", "--hf-overrides.use_cache=true"],
        {},
    )  # fmt: skip
    assert [arg for arg in argv if "overrides" in arg] == ["--hf-overrides"]
    assert json.loads(value_of(argv, "--hf-overrides")) == {
        "architectures": ["Emu3ForImageGeneration"],
        "text_config": {"max_position_embeddings": 1612, "rope_theta": 5.0, "tie_word_embeddings": False},
        "use_cache": True,
    }


def test_the_merged_hf_overrides_reach_vllms_engine_arguments(emu3_dir):
    """vLLM's own `serve` parser reads the arguments our command hands it (no server is started)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = serve_argv(
        ["serve", emu3_dir, "--decoding", "ntp", "--hf-overrides.text_config.rope_theta", "5"], {}
    )
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv[1:])
    args.model = args.model_tag
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.hf_overrides == {
        "architectures": ["Emu3ForImageGeneration"],
        "text_config": {"max_position_embeddings": 1612, "rope_theta": 5},
    }
    assert engine_args.dtype == "float32"  # this machine is vLLM's CPU platform


def test_hf_overrides_that_drop_our_model_class_are_refused_before_vllm_starts(emu3_dir):
    drop = json.dumps({"architectures": ["Emu3ForConditionalGeneration"]})
    with pytest.raises(CommandError, match="--hf-overrides: .*drop 'architectures'"):
        serve_argv(["serve", emu3_dir, "--decoding", "ntp", "--hf-overrides=" + drop], {})
    with pytest.raises(CommandError, match="--hf-overrides must be a JSON object"):
        serve_argv(["serve", emu3_dir, "--decoding", "ntp", "--hf-overrides", "[1]"], {})


def test_without_decoding_hf_overrides_are_vllms(emu3_dir):
    argv = ["serve", emu3_dir, "--hf-overrides", '{"architectures": ["X"]}']
    assert serve_argv(argv, {}) == argv


def test_zipar_drafts_raise_max_model_len_unless_the_user_gives_one(model_dir):
    """A draft image's KV sequence holds its superseded guesses: `--zipar-drafts L` serves a longer
    sequence than plain ZipAR's; a user's `--max-model-len` is kept and the position cap lifted to it."""
    plain = int(value_of(serve_argv(["serve", model_dir, "--decoding", "ntp"], {}), "--max-model-len"))
    drafting = serve_argv(["serve", model_dir, "--decoding", "ntp", "--zipar-drafts", "4"], {})
    raised = int(value_of(drafting, "--max-model-len"))
    assert raised > plain
    assert json.loads(value_of(drafting, "--hf-overrides"))["max_position_embeddings"] == raised
    given = serve_argv(
        ["serve", model_dir, "--decoding", "ntp", "--zipar-drafts", "4", "--max-model-len=900"], {}
    )
    assert "--max-model-len" not in given and "--max-model-len=900" in given
    assert json.loads(value_of(given, "--hf-overrides"))["max_position_embeddings"] == 900
