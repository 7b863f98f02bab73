"""Helpers shared by the server tests of every family: a real `vllm serve` on a model directory, an `openai`
client on it, raw posts to the images route, PNG decoding, and the bad-input check."""

from __future__ import annotations

import base64
import io
import json
from contextlib import contextmanager

import httpx
from PIL import Image

from tests.serving.conftest import SERVER_ARGS
from vllm_zipar.serving.served_model import ServedModel

ROUTE = "/v1/images/generations"


@contextmanager
def served_model(model_dir, tmp_path_factory, *, window: int, name: str):
    """`vllm serve model_dir --decoding zipar --zipar-window window` with the tests' engine arguments."""
    log = tmp_path_factory.mktemp("log") / "server.log"
    server = ServedModel(
        model_dir, zipar_window=window, served_model_name=name, extra_args=SERVER_ARGS, log_path=log
    )
    with server:
        yield server


def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def post(server, body, timeout: float = 120.0) -> httpx.Response:
    """POST a JSON body (or raw bytes) to the images route."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    return httpx.post(server.url + ROUTE, content=raw, headers=headers, timeout=timeout)


def assert_a_400_naming_the_field(
    server, body, param: str, code: str | None, words: str, ok_body: dict
) -> None:
    """`body` gets an OpenAI-style 400 naming `param` (and `code`, when given) with `words` in its message;
    then `ok_body` still gets one image and every KV block is back."""
    response = post(server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    if code is not None:
        assert error["code"] == code
    assert words in error["message"]
    ok = post(server, ok_body)
    assert ok.status_code == 200 and len(ok.json()["data"]) == 1
    assert server.idle_kv_usage() == 0.0
