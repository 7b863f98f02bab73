"""The body of `POST /v1/images/generations`, read and checked field by field (OpenAI's Images API).

OpenAI fields: `model`, `prompt` (class-to-image models: a class index or class name; text-to-image: text),
`n` (1-10), `size` (one of the model's "WxH" sizes, or "auto": its native one), `response_format`
("b64_json"; "url" is refused), `output_format` (png, jpeg, webp), `output_compression` (0-100, jpeg/webp),
`stream`, `partial_images` (0-3), `user`; `quality`, `background` ("transparent" is refused), `moderation`
and `style` are accepted and ignored. Extension fields sit at the top level of the body, as vLLM-Omni does:
`seed`, `negative_prompt` (text-to-image), `guidance_scale` (alias `cfg_scale`), `cfg_interval`, `decoding`,
`zipar_window`, `zipar_drafts`, `temperature`, `top_k`, `top_p`, `partial_frames` (like `partial_images`, up
to 256: the playground's frames), and the debug field `return_tokens`. Anything else is a 400 naming it.

Every check raises `ImageAPIError`, which carries the HTTP status and OpenAI's error body (`message`, `type`,
`param`, `code`): nothing malformed may reach the engine core, where an exception ends the engine, and nothing
vLLM would refuse reaches vLLM (its errors use another schema). Messages quote a short prefix of a value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vllm_zipar.models.prompt_error import QUOTE_CHARS, quote
from vllm_zipar.zipar.seeding import MAX_REQUEST_SEED

MAX_IMAGES = 10
MAX_PARTIAL_IMAGES = 3
MAX_PARTIAL_FRAMES = 256  # extension `partial_frames`: OpenAI's 3 partial images are too few to watch
OUTPUT_FORMATS = ("png", "jpeg", "webp")
IGNORED_FIELDS = ("quality", "moderation", "style")
MAX_TEMPERATURE = 2.0  # vLLM's own bound (SamplingParams), checked here so the error is ours
MAX_ZIPAR_DRAFTS = 1 << 12  # guesses per chain per pass; the engine cuts them to its budgets anyway
MAX_CFG_SCALE = 50.0  # far above useful ones (LlamaGen: 1.5-4); 1e308 overflowed the logits: a blank image


@dataclass(frozen=True)
class RequestLimits:
    """Bounds that come from the served model (defaults: generous, for parsing without a model)."""

    max_window: int = 1 << 16  # a window of the grid's cell count or more is next-token order already
    max_cfg_interval: int = 1 << 16
    max_top_k: int = 1 << 16  # the codebook size
    max_prompt_chars: int = 256  # class-to-image: the longest class name, with room for spacing and case
    prompt_kind: str = "class"  # "class" or "text" (ImageModel.prompt_kind)
    negative_prompt: bool = False  # whether the model takes a negative prompt
    unconditional_context: str = "its own unconditional prompt"  # ImagePrompts.unconditional_context


class ImageAPIError(Exception):
    """An OpenAI-style error response."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = "invalid_value",
        status: int = 400,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status
        self.type = type

    @classmethod
    def server_error(cls, message: str) -> ImageAPIError:
        return cls(message, code="server_error", status=500, type="server_error")

    @classmethod
    def unavailable(cls, message: str, code: str = "server_shutting_down") -> ImageAPIError:
        return cls(message, code=code, status=503, type="server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ImageGenerationRequest:
    prompt: str
    model: str | None = None
    n: int = 1
    output_format: str = "png"
    output_compression: int | None = None
    stream: bool = False
    partial_images: int = 0
    user: str | None = None
    seed: int | None = None
    size: str | None = None
    negative_prompt: str | None = None
    cfg_scale: float | None = None
    cfg_interval: int | None = None
    decoding: str | None = None
    zipar_window: int | None = None
    zipar_drafts: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    return_tokens: bool = False

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `ImageRequests.request_inputs` (seed excluded: it varies per image)."""
        return {
            "size": self.size,
            "negative_prompt": self.negative_prompt,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "decoding": self.decoding,
            "zipar_window": self.zipar_window,
            "zipar_drafts": self.zipar_drafts,
            "cfg_scale": self.cfg_scale,
            "cfg_interval": self.cfg_interval,
        }


def _type_error(param: str, expected: str, value: Any) -> ImageAPIError:
    return ImageAPIError(
        f"Invalid type for '{param}': expected {expected}, but got {type(value).__name__} {quote(value)}.",
        param=param,
        code="invalid_type",
    )


def _int(body: dict[str, Any], param: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(param)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(param, "an integer", value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise ImageAPIError(f"'{param}' must be {bounds}, got {quote(value)}.", param=param)
    return value


def _number(
    body: dict[str, Any], param: str, low: float | None = None, high: float | None = None, note: str = ""
) -> float | None:
    value = body.get(param)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(param, "a finite number", value)
    try:
        number = float(value)  # an int beyond float's range raises OverflowError
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _type_error(param, "a finite number", value)
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f">= {low:g}" if high is None else f"between {low:g} and {high:g}"
        raise ImageAPIError(f"'{param}' must be {bounds}{note}, got {quote(value)}.", param=param)
    return number


def _str(body: dict[str, Any], param: str) -> str | None:
    value = body.get(param)
    if value is not None and not isinstance(value, str):
        raise _type_error(param, "a string", value)
    return value


def _bool(body: dict[str, Any], param: str) -> bool:
    value = body.get(param, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _type_error(param, "a boolean", value)
    return value


KNOWN_FIELDS = set(ImageGenerationRequest.__dataclass_fields__) | {"size", "response_format", "background"}
KNOWN_FIELDS |= set(IGNORED_FIELDS) | {"partial_frames", "guidance_scale"}


def parse_request(
    raw: bytes, sizes: str | Sequence[str], limits: RequestLimits | None = None
) -> ImageGenerationRequest:
    """Read and check a request body; `sizes` are the model's "WxH" sizes (native first), `limits` its
    bounds."""
    limits = limits or RequestLimits()
    sizes = [sizes] if isinstance(sizes, str) else list(sizes)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        reason = quote(str(err), 120)[1:-1] if isinstance(err, ValueError) else "nested too deeply"
        raise ImageAPIError(f"The request body is not valid JSON: {reason}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ImageAPIError("The request body must be a JSON object.", code="invalid_json")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        name = unknown[0]
        raise ImageAPIError(
            f"Unknown parameter: {quote(name)}.", param=name[:QUOTE_CHARS], code="unknown_parameter"
        )

    prompt = _str(body, "prompt")
    if prompt is None:
        raise ImageAPIError(
            "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter"
        )
    text_prompts = limits.prompt_kind == "text"
    if not prompt.strip():
        what = "must not be empty" if text_prompts else "must name a class (an index or a class name)"
        raise ImageAPIError(f"'prompt' {what}.", param="prompt")
    if len(prompt) > limits.max_prompt_chars:
        what = "" if text_prompts else "any class name of "
        raise ImageAPIError(
            f"'prompt' {quote(prompt)} is longer than {what}this model's limit "
            f"(at most {limits.max_prompt_chars} characters).",
            param="prompt",
            code="prompt_too_long" if text_prompts else "unknown_class",
        )
    negative_prompt = _str(body, "negative_prompt")
    if negative_prompt is not None:
        if not limits.negative_prompt:
            raise ImageAPIError(
                "'negative_prompt' is not supported by this model: its guidance runs against "
                f"{limits.unconditional_context}.",
                param="negative_prompt",
                code="unsupported_parameter",
            )
        if len(negative_prompt) > limits.max_prompt_chars:
            raise ImageAPIError(
                f"'negative_prompt' is longer than this model's limit ({limits.max_prompt_chars} chars).",
                param="negative_prompt",
                code="prompt_too_long",
            )
    n = _int(body, "n", 1, MAX_IMAGES)

    size = _str(body, "size")
    if size not in (None, "auto", *sizes):
        if len(sizes) == 1:
            allowed = f"This model generates {sizes[0]} images only (use '{sizes[0]}' or 'auto')."
        else:
            allowed = "Supported sizes: " + ", ".join(f"'{s}'" for s in sizes) + ", or 'auto'."
        raise ImageAPIError(
            f"Invalid value for 'size': {quote(size)}. {allowed}", param="size", code="unsupported_value"
        )
    response_format = _str(body, "response_format")
    if response_format == "url":
        raise ImageAPIError(
            "response_format 'url' is not supported by this server: images are returned inline; "
            "use 'b64_json'.",
            param="response_format",
            code="unsupported_value",
        )
    if response_format not in (None, "b64_json"):
        raise ImageAPIError(
            f"Invalid value for 'response_format': {quote(response_format)}; supported: 'b64_json'.",
            param="response_format",
            code="unsupported_value",
        )
    output_format = _str(body, "output_format")
    if output_format not in (None, *OUTPUT_FORMATS):
        raise ImageAPIError(
            f"Invalid value for 'output_format': {quote(output_format)}; "
            f"supported: {', '.join(OUTPUT_FORMATS)}.",
            param="output_format",
            code="unsupported_value",
        )
    output_compression = _int(body, "output_compression", 0, 100)
    background = _str(body, "background")
    if background not in (None, "auto", "opaque"):
        raise ImageAPIError(
            f"Invalid value for 'background': {quote(background)}; this model draws opaque images.",
            param="background",
            code="unsupported_value",
        )
    for param in IGNORED_FIELDS:
        _str(body, param)

    stream = _bool(body, "stream")
    partial_images = _int(body, "partial_images", 0, MAX_PARTIAL_IMAGES)
    if partial_images and not stream:
        raise ImageAPIError("'partial_images' needs 'stream': true.", param="partial_images")
    partial_frames = _int(body, "partial_frames", 0, MAX_PARTIAL_FRAMES)
    if partial_frames and not stream:
        raise ImageAPIError("'partial_frames' needs 'stream': true.", param="partial_frames")
    if partial_frames and partial_images:
        raise ImageAPIError("Give 'partial_images' or 'partial_frames', not both.", param="partial_frames")

    decoding = _str(body, "decoding")
    if decoding not in (None, "zipar", "ntp"):
        raise ImageAPIError(
            f"Invalid value for 'decoding': {quote(decoding)}; supported: 'zipar', 'ntp'.",
            param="decoding",
            code="unsupported_value",
        )
    zipar_window = _int(body, "zipar_window", 1, limits.max_window)
    if decoding == "ntp" and zipar_window is not None:
        raise ImageAPIError("'zipar_window' goes with decoding 'zipar', not 'ntp'.", param="zipar_window")
    if "cfg_scale" in body and "guidance_scale" in body:
        raise ImageAPIError(
            "Give 'guidance_scale' or its alias 'cfg_scale', not both.", param="guidance_scale"
        )
    scale_param = "guidance_scale" if "guidance_scale" in body else "cfg_scale"
    cfg_scale = _number(body, scale_param, 1.0, MAX_CFG_SCALE, " (1 disables guidance)")
    temperature = _number(body, "temperature", 0.0, MAX_TEMPERATURE)
    top_p = _number(body, "top_p")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ImageAPIError(f"'top_p' must be in (0, 1], got {quote(body['top_p'])}.", param="top_p")

    return ImageGenerationRequest(
        prompt=prompt,
        model=_str(body, "model"),
        n=n if n is not None else 1,
        output_format=output_format or "png",
        output_compression=output_compression,
        stream=stream,
        partial_images=partial_images or partial_frames or 0,
        user=_str(body, "user"),
        seed=_int(body, "seed", 0, MAX_REQUEST_SEED),
        size=None if size in (None, "auto") else size,
        negative_prompt=negative_prompt,
        cfg_scale=cfg_scale,
        cfg_interval=_int(body, "cfg_interval", -1, limits.max_cfg_interval),
        decoding=decoding,
        zipar_window=zipar_window,
        zipar_drafts=_int(body, "zipar_drafts", 0, MAX_ZIPAR_DRAFTS),
        temperature=temperature,
        top_k=_int(body, "top_k", 0, limits.max_top_k),
        top_p=top_p,
        return_tokens=_bool(body, "return_tokens"),
    )


def param_of_engine_error(message: str) -> str | None:
    """Which request field a `ValueError` from `ImageRequests.request_inputs` is about."""
    params = ("zipar_window", "zipar_drafts", "cfg_interval", "cfg_scale", "temperature", "top_p", "top_k")
    for param in (*params, "decoding"):
        if param in message:
            return param
    if "max_num_batched_tokens" in message:
        return "zipar_window"
    if "max_model_len" in message:
        return "size"
    if "class" in message:
        return "prompt"
    return None
