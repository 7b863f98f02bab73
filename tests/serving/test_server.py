"""`vllm serve MODEL_DIR --decoding zipar` end to end, through the official `openai` client.

One server for the whole module (start-up dominates on CPU): images decode to PNGs of the native size,
seeded requests repeat byte for byte, ZipAR and NTP tokens equal the reference decoders, streaming sends the
promised partial images, every bad input is a documented 400/404, and after a run of mixed bad, good and
abandoned requests the server is healthy with vLLM's KV usage back at zero.
"""

from __future__ import annotations

import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.reference.decoders import ntp_decode, zipar_decode
from tests.serving.conftest import GRID, write_image_model
from tests.serving.served import openai_client, png, post, served_model
from vllm_zipar.zipar.seeding import image_seed

pytestmark = pytest.mark.serving

MODEL = "tiny"
SIZE = f"{2 * GRID}x{2 * GRID}"
SAMPLING = {"temperature": 1.0, "top_k": 100, "top_p": 0.95}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("served")
    _, oracle = write_image_model(model_dir, seed=7)
    with served_model(model_dir, tmp_path_factory, window=4, name=MODEL) as server:
        yield server, oracle


@pytest.fixture(scope="module")
def client(served):
    return openai_client(served[0])


def test_openai_client_returns_n_pngs_of_the_native_size(client):
    result = client.images.generate(model=MODEL, prompt="3", n=3, size=SIZE, response_format="b64_json")
    assert len(result.data) == 3 and result.created > 0
    images = [png(item.b64_json) for item in result.data]
    assert all(image.format == "PNG" and image.size == (2 * GRID, 2 * GRID) for image in images)
    assert result.usage.output_tokens == 3 * GRID * GRID


def test_class_names_and_output_formats(client):
    for prompt, output_format, pil_format in [("Seven", "jpeg", "JPEG"), ("zero", "webp", "WEBP")]:
        result = client.images.generate(model=MODEL, prompt=prompt, output_format=output_format)
        assert png(result.data[0].b64_json).format == pil_format


def test_a_seeded_request_returns_the_same_bytes_twice(client):
    first, second = (
        client.images.generate(model=MODEL, prompt="5", n=2, extra_body={"seed": 9, **SAMPLING})
        for _ in range(2)
    )
    assert [d.b64_json for d in first.data] == [d.b64_json for d in second.data]
    assert first.data[0].b64_json != first.data[1].b64_json  # image_seed(9, 0) = 9, image_seed(9, 1)


def test_neighbouring_seeds_share_no_image(client):
    """With `seed + i`, seed=0 n=4 and seed=1 n=4 shared three images; derived seeds share none."""
    images = [
        {
            d.b64_json
            for d in client.images.generate(model=MODEL, prompt="5", n=4, extra_body={"seed": s}).data
        }
        for s in (0, 1)
    ]
    assert len(images[0]) == len(images[1]) == 4 and not images[0] & images[1]


@pytest.mark.parametrize("decoding", [{"zipar_window": 3}, {"decoding": "ntp"}, {}])
def test_tokens_equal_the_reference_decoder(served, client, decoding):
    _, oracle = served
    body = {"seed": 11, "return_tokens": True, **SAMPLING, **decoding}
    result = client.images.generate(model=MODEL, prompt="4", n=2, extra_body=body)
    for index, item in enumerate(result.data):
        tokens = torch.tensor(item.model_extra["tokens"])
        reference = dict(seed=image_seed(11, index), **SAMPLING)
        if decoding.get("decoding") == "ntp":
            expected = ntp_decode(oracle, 4, GRID, GRID, **reference)[0]
        else:  # the server's default window is 4
            expected = zipar_decode(oracle, 4, GRID, GRID, decoding.get("zipar_window", 4), **reference)[0]
        assert torch.equal(tokens, expected), (decoding, index)


def test_streaming_sends_the_partial_images_then_the_final_one(client):
    body = {"seed": 3, **SAMPLING}
    stream = client.images.generate(
        model=MODEL, prompt="2", stream=True, partial_images=2, extra_body={**body, "zipar_window": 2}
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(png(e.b64_json).size == (2 * GRID, 2 * GRID) for e in events)
    plain = client.images.generate(model=MODEL, prompt="2", extra_body={**body, "zipar_window": 2})
    assert events[-1].b64_json == plain.data[0].b64_json
    assert events[-1].usage.output_tokens == GRID * GRID


def test_streaming_n_images_tags_each_event_with_its_image(client):
    stream = client.images.generate(
        model=MODEL, prompt="8", n=2, stream=True, partial_images=1, extra_body={"seed": 4}
    )
    events = [(e.type, e.model_extra["image_index"]) for e in stream]
    for index in (0, 1):
        mine = [kind for kind, image in events if image == index]
        assert mine == ["image_generation.partial_image", "image_generation.completed"], events


def test_a_stream_abandoned_after_its_first_event_is_aborted(served):
    """A client that leaves mid-stream gets its engine requests aborted.

    On the tiny 8x8 model ten images can all finish before the server sees the socket close, which proves
    nothing either way; so other clients keep the engine busy (16 slots), and the check retries. It only
    skips if no attempt ever left work to abort.
    """
    server, _ = served
    body = {"prompt": "1", "stream": True, "partial_images": 3, "decoding": "ntp", "n": 10, "seed": 2}
    busy = {"prompt": "2", "n": 10, "decoding": "ntp", "cfg_scale": 4.0, "seed": 5}
    for _attempt in range(4):
        before = server.log_tail(10**7).count("client disconnected, aborted")
        with ThreadPoolExecutor(max_workers=2) as pool:
            load = [pool.submit(post, server, busy) for _ in range(2)]
            time.sleep(0.3)  # the busy requests take the engine's slots first
            with httpx.stream(
                "POST", server.url + "/v1/images/generations", json=body, timeout=120
            ) as response:
                assert next(response.iter_lines()).startswith("event: image_generation.partial_image")
            deadline = time.monotonic() + 10
            while (
                server.log_tail(10**7).count("client disconnected, aborted") == before
                and time.monotonic() < deadline
            ):
                time.sleep(0.2)
            assert all(f.result().status_code == 200 for f in load)
        log = server.log_tail(10**7)
        if log.count("client disconnected, aborted") == before + 1:
            assert server.idle_kv_usage() == 0.0
            request = re.findall(r"image request (img-\w+)-0: client disconnected", log)[-1]
            assert log.count(f"image {request}-") < 10  # its engine requests were aborted, not run to the end
            return
    assert server.idle_kv_usage() == 0.0
    pytest.skip("every attempt finished all ten images before the server saw the client leave")


ERRORS = [
    (b"{oops", 400, None, "invalid_json"),
    ({"model": MODEL}, 400, "prompt", "missing_required_parameter"),
    ({"prompt": "unicorn"}, 400, "prompt", "unknown_class"),
    ({"prompt": "10"}, 400, "prompt", "unknown_class"),
    ({"prompt": "1", "n": 11}, 400, "n", "invalid_value"),
    ({"prompt": "1", "n": "two"}, 400, "n", "invalid_type"),
    ({"prompt": "1", "size": "1024x1024"}, 400, "size", "unsupported_value"),
    ({"prompt": "1", "response_format": "url"}, 400, "response_format", "unsupported_value"),
    ({"prompt": "1", "output_format": "gif"}, 400, "output_format", "unsupported_value"),
    ({"prompt": "1", "zipar_window": 0}, 400, "zipar_window", "invalid_value"),
    ({"prompt": "1", "cfg_scale": -2}, 400, "cfg_scale", "invalid_value"),
    ({"prompt": "1", "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ({"prompt": "1", "steps": 3}, 400, "steps", "unknown_parameter"),
    ({"prompt": "1", "model": "dall-e-3"}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize("body, status, param, code", ERRORS)
def test_bad_input_gets_the_documented_error(served, body, status, param, code):
    response = post(served[0], body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")


def test_openai_client_raises_on_url_format(client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="not supported"):
        client.images.generate(model=MODEL, prompt="1", response_format="url")


def test_mixed_bad_good_and_abandoned_requests_leave_the_server_healthy(served):
    server, _ = served
    good = {"prompt": "6", "seed": 1, **SAMPLING}
    bodies = []
    for i in range(200):
        if i % 8 == 0:  # 25 good requests among 175 bad ones
            bodies.append(({**good, "zipar_window": 1 + i % 7}, 200))
        else:
            body, status, _, _ = ERRORS[i % len(ERRORS)]
            bodies.append((body, status))

    def send(item):
        body, status = item
        return post(server, body).status_code == status

    def abandon(i):  # a client that leaves mid-image: the server must abort its engine requests
        body = json.dumps({**good, "decoding": "ntp", "n": 10, "seed": i}).encode()
        head = f"POST /v1/images/generations HTTP/1.1\r\nHost: {server.host}\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(head.encode() + body)
            time.sleep(0.05)  # 10 NTP images take several times longer than this

    aborted_before = server.log_tail(10**7).count("client disconnected, aborted")
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(abandon, range(8)))
        outcomes = list(pool.map(send, bodies))
    assert all(outcomes), [b for b, ok in zip(bodies, outcomes, strict=True) if not ok][:3]
    assert server.idle_kv_usage() == 0.0
    # Each abandoned request is aborted unless it finished first (never seen here; a fast machine might).
    aborted = server.log_tail(10**7).count("client disconnected, aborted") - aborted_before
    assert 1 <= aborted <= 8, aborted
    assert server.healthy()
    assert len(post(server, good).json()["data"]) == 1


def test_metrics_and_one_log_line_per_image(served, client):
    server, _ = served
    served_before = server.metric("vllm:zipar_images_served_total")
    client.images.generate(model=MODEL, prompt="1", n=2, extra_body={"zipar_window": 2})
    assert server.metric("vllm:zipar_images_served_total") == served_before + 2
    for name in (
        "vllm:zipar_seconds_per_image_count",
        "vllm:zipar_forward_passes_per_image_count",
        "vllm:zipar_grid_cells_per_pass_count",
        "vllm:zipar_images_total",
    ):
        assert server.metric(name) > 0, name
    log = server.log_path.read_text()
    lines = [line for line in log.splitlines() if "image img-" in line and "passes=" in line]
    assert len(lines) >= served_before + 2
    assert "decoding=zipar window=2" in log and "seconds=" in lines[-1]
