"""Our `vllm` console command: vLLM's own CLI, plus `vllm serve MODEL_DIR --decoding zipar|ntp`.

vLLM has no hook for plugin flags on `vllm serve`, so (as vLLM-Omni does for `--omni`) this package installs
the `vllm` console script. It applies our CLI patches (`vllm_zipar.patches`: the CPU build's version lookup,
the flags in `--help`), takes `--decoding` / `--zipar-window` out of the arguments, adds the engine arguments
an image model needs unless the user gave them (`engine_args.image_engine_args`; the user's `--hf-overrides`
goes back merged with the family's), allow-lists our HTTP route in `VLLM_PLUGINS`, and hands everything else
to `vllm.entrypoints.cli.main.main` unchanged. Without `--decoding` it is exactly vLLM's command. The route's
bounds (`--drain-timeout`, `--max-request-bytes`, `--request-body-timeout`, `--max-header-bytes`,
`--request-header-timeout`) reach the API server as
environment variables. Once vLLM returns, the command exits non-zero if the engine died under the route
(vLLM itself exits 0 then).
"""

from __future__ import annotations

import json
import os
import sys
from argparse import ArgumentTypeError
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ENDPOINT_PLUGIN_NAME = "vllm_zipar_images"
DEFAULT_ZIPAR_WINDOW = 8
# The route's bounds: flag -> (environment variable the API server reads, value type).
ROUTE_FLAGS = {
    "--drain-timeout": ("VLLM_ZIPAR_DRAIN_TIMEOUT", float),
    "--max-request-bytes": ("VLLM_ZIPAR_MAX_REQUEST_BYTES", int),
    "--request-body-timeout": ("VLLM_ZIPAR_REQUEST_BODY_TIMEOUT", float),
    "--max-header-bytes": ("VLLM_ZIPAR_MAX_HEADER_BYTES", int),
    "--request-header-timeout": ("VLLM_ZIPAR_REQUEST_HEADER_TIMEOUT", float),
}
OUR_FLAGS = ("--decoding", "--zipar-window", "--zipar-drafts", *ROUTE_FLAGS)
# Taken out of argv and given back merged with the family's (engine_args.merge_hf_overrides).
HF_OVERRIDES = "--hf-overrides"


class CommandError(ValueError):
    pass


def _flag_names(flag: str) -> tuple[str, ...]:
    """The spellings vLLM's parser accepts for one flag (it reads `_` and `-` alike)."""
    return (flag, "--" + flag[2:].replace("-", "_"))


def _has_flag(argv: Sequence[str], flag: str) -> bool:
    names = _flag_names(flag)
    negated = tuple("--no-" + name[2:] for name in names)
    return any(arg in names + negated or arg.split("=", 1)[0] in names for arg in argv)


def _int_flag(argv: Sequence[str], flag: str) -> int | None:
    """The user's integer value of `flag` (`--f v` or `--f=v`), None when absent or not a plain integer
    (vLLM parses it then)."""
    names = _flag_names(flag)
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in names:
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            return int(value) if value.isdigit() else None
    return None


def take_our_flags(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """`argv` without `--decoding` / `--zipar-window` (any spelling, `--f v` or `--f=v`), and their values."""
    rest: list[str] = []
    found: dict[str, str] = {}
    spellings = {name: flag for flag in OUR_FLAGS for name in _flag_names(flag)}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in spellings:
            if not eq:
                if i + 1 >= len(argv):
                    raise CommandError(f"{name} needs a value")
                value = argv[i + 1]
                i += 1
            found[spellings[name]] = value
        else:
            rest.append(arg)
        i += 1
    return rest, found


def take_hf_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, Any] | None]:
    """`argv` without the user's `--hf-overrides` (`--hf-overrides JSON`, `--hf-overrides=JSON`, or vLLM's
    dotted `--hf-overrides.key.sub VALUE`), and their values merged into one dict (None: none given)."""
    from vllm_zipar.serving.engine_args import deep_merge

    names = _flag_names(HF_OVERRIDES)
    rest: list[str] = []
    found: dict[str, Any] | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        head, dot, path = name.partition(".")
        if head not in names:
            rest.append(arg)
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise CommandError(f"{name} needs a value")
            value = argv[i + 1]
            i += 1
        found = deep_merge(found or {}, _dotted_value(path, value) if dot else _json_object(name, value))
        i += 1
    return rest, found


def _json_object(flag: str, value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise CommandError(f"{flag} must be a JSON object, got {value!r} ({err})") from None
    if not isinstance(parsed, dict):
        raise CommandError(f"{flag} must be a JSON object, got {value!r}")
    return parsed


def _dotted_value(path: str, value: str) -> dict[str, Any]:
    """`--hf-overrides.a.b VALUE` as `{"a": {"b": VALUE}}`, VALUE read as vLLM's parser reads it (JSON, else
    a number like `80k`, else the string; `a.b+ x,y` is the list `["x", "y"]`)."""
    parsed: Any
    if path.endswith("+"):
        path, parsed = path[:-1], value.split(",")
    else:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            from vllm.utils.argparse_utils import human_readable_int

            try:
                parsed = human_readable_int(value)
            except (ValueError, TypeError, ArgumentTypeError):
                parsed = value
    for key in reversed(path.split(".")):
        parsed = {key: parsed}
    return parsed


def model_of(argv: Sequence[str]) -> str | None:
    """The model of `serve` arguments (`argv[0]` is "serve"): `--model X` or the first positional."""
    for i, arg in enumerate(argv):
        if arg in ("--model",) and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    if len(argv) > 1 and not argv[1].startswith("-"):
        return argv[1]
    return None


def engine_flags(
    model_dir: str,
    decoding: str,
    window: int | None,
    argv: Sequence[str],
    user_hf_overrides: dict[str, Any] | None = None,
    drafts: int = 0,
) -> list[str]:
    """The `vllm serve` flags our engine arguments become, leaving out every one the user set (`argv`);
    `--hf-overrides` is the family's merged with `user_hf_overrides` (already taken out of `argv`)."""
    from vllm_zipar.engine.request_config import ImageDecoding
    from vllm_zipar.models.registry import load_image_model
    from vllm_zipar.serving.engine_args import HfOverridesError, image_engine_args

    try:
        model = load_image_model(model_dir)
    except (OSError, TypeError, ValueError) as err:
        raise CommandError(f"--decoding needs a vllm-zipar model directory; {model_dir}: {err}") from err
    chosen = ImageDecoding.parse(decoding, window).with_drafts(drafts)
    user_set = {}
    for key in ("gpu_memory_utilization", "kv_cache_memory_bytes"):
        if _has_flag(argv, "--" + key.replace("_", "-")):
            user_set[key] = True
    overrides: dict[str, Any] = {} if user_hf_overrides is None else {"hf_overrides": user_hf_overrides}
    max_len = _int_flag(argv, "--max-model-len")
    if max_len is not None:  # the family lifts its position cap to it; drafts check that they fit it
        overrides["max_model_len"] = max_len
    try:
        kwargs = image_engine_args(model, chosen, overrides)
    except HfOverridesError as err:
        raise CommandError(f"--hf-overrides: {err}") from None
    if user_set:  # the user sized the KV cache: our CPU default must not compete with it
        kwargs.pop("kv_cache_memory_bytes", None)
    flags: list[str] = []
    for key, value in kwargs.items():
        if key == "model":
            continue
        flag = "--" + key.replace("_", "-")
        if key == "additional_config":
            flags += _additional_config(argv, value)
            continue
        if _has_flag(argv, flag):
            continue
        if value is True:
            flags.append(flag)
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def _additional_config(argv: Sequence[str], ours: dict) -> list[str]:
    """Our `zipar` entry goes into the user's `--additional-config` JSON unless it has one already."""
    names = _flag_names("--additional-config")
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in names:
            raw = value if eq else (argv[i + 1] if i + 1 < len(argv) else "{}")
            try:
                user = json.loads(raw)
            except json.JSONDecodeError:
                return []  # vLLM reports the malformed JSON itself
            if "zipar" in user:
                return []
            raise CommandError(
                "--additional-config is given without a 'zipar' entry; add "
                f"{json.dumps({'zipar': ours['zipar']})} to it or drop --decoding"
            )
    return ["--additional-config", json.dumps(ours)]


def allow_our_route(environ: dict[str, str]) -> None:
    """Endpoint plugins load only when named in VLLM_PLUGINS, and naming any plugin there drops every
    general plugin not named: so list all installed general plugins (ours included) plus the route."""
    from importlib.metadata import entry_points

    current = environ.get("VLLM_PLUGINS")
    if current is None:
        names = [ep.name for ep in entry_points(group="vllm.general_plugins")]
    else:
        names = [name.strip() for name in current.split(",") if name.strip()]
        if "vllm_zipar" not in names:
            names.append("vllm_zipar")
    if ENDPOINT_PLUGIN_NAME not in names:
        names.append(ENDPOINT_PLUGIN_NAME)
    environ["VLLM_PLUGINS"] = ",".join(dict.fromkeys(names))


def serve_argv(argv: list[str], environ: dict[str, str] | None = None) -> list[str]:
    """`vllm serve ...` arguments with ours replaced by engine arguments (argv[0] is "serve")."""
    environ = os.environ if environ is None else environ
    rest, ours = take_our_flags(argv)
    for flag, (variable, kind) in ROUTE_FLAGS.items():
        if flag in ours:
            value = ours.pop(flag)
            try:
                number = kind(value)
            except ValueError:
                number = -1
            if not number > 0:
                raise CommandError(f"{flag} must be a number > 0, got {value!r}")
            environ[variable] = str(number)
    if not ours or any(arg == "-h" or arg.startswith("--help") for arg in rest):
        return rest
    decoding = ours.get("--decoding", "zipar")
    window: int | None = None
    if "--zipar-window" in ours:
        if decoding != "zipar":
            raise CommandError(f"--zipar-window goes with --decoding zipar, not --decoding {decoding}")
        try:
            window = int(ours["--zipar-window"])
        except ValueError:
            value = ours["--zipar-window"]
            raise CommandError(f"--zipar-window must be an integer >= 1, got {value!r}") from None
    elif decoding == "zipar":
        window = DEFAULT_ZIPAR_WINDOW
    if decoding not in ("zipar", "ntp"):
        raise CommandError(f"--decoding must be 'zipar' or 'ntp', got {decoding!r}")
    if window is not None and window < 1:
        raise CommandError(f"--zipar-window must be an integer >= 1, got {window}")
    drafts = 0
    if "--zipar-drafts" in ours:  # exact drafts (docs/exact_drafts.md): the server's default per request
        value = ours["--zipar-drafts"]
        drafts = int(value) if value.isdigit() else -1
        if drafts < 0:
            raise CommandError(f"--zipar-drafts must be an integer >= 0, got {value!r}")
    model = model_of(rest)
    if model is None or not Path(model, "config.json").is_file():
        raise CommandError(f"--decoding needs a model directory with a config.json, got {model!r}")
    rest, user_hf_overrides = take_hf_overrides(rest)
    flags = engine_flags(model, decoding, window, rest, user_hf_overrides, drafts)
    allow_our_route(environ)
    return rest + flags


def main() -> None:
    from vllm_zipar.patches import apply_cli_patches
    from vllm_zipar.serving import lifecycle, quiet_logs

    argv = sys.argv[1:]
    if argv[:1] == ["serve"]:
        quiet_logs.install()
        try:
            argv = serve_argv(argv)
        except CommandError as err:
            print(f"vllm serve: error: {err}", file=sys.stderr)
            sys.exit(2)
    apply_cli_patches()
    if argv[:1] == ["serve"] and ENDPOINT_PLUGIN_NAME in os.environ.get("VLLM_PLUGINS", "").split(","):
        from vllm_zipar.patches import apply_image_serving_patches

        apply_image_serving_patches()  # before vLLM builds its engine client in this process
    sys.argv = [sys.argv[0], *argv]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()
    if lifecycle.exit_status:
        sys.exit(lifecycle.exit_status)


if __name__ == "__main__":
    main()
