"""The server under faults, on loopback: bad bodies, slow and vanishing clients, an abort storm, SIGTERM under
load, and a killed engine core.

Two servers: one for the module (its last test sends it SIGTERM), one whose engine core is killed. Every
response of the route is OpenAI's error body; after each fault the server keeps serving and vLLM's KV usage
returns to zero. Times are bounded generously (this machine is shared), never compared with each other.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from tests.serving.conftest import SERVER_ARGS, write_image_model
from vllm_zipar.serving.served_model import ServedModel

pytestmark = pytest.mark.serving

ROUTE = "/v1/images/generations"
BODY_TIMEOUT = 2.0
DRAIN = 4.0
MARGIN = 60.0  # drain time + this bounds every wait: generous for a loaded machine, far below a hang
LIGHT = {"prompt": "3", "seed": 1}  # one 8x8 ZipAR image: well under a second
HEAVY = {"prompt": "2", "n": 10, "decoding": "ntp", "cfg_scale": 4.0}  # 20 sequences of 64 passes each


def start_server(tmp_path_factory, name: str, extra: tuple[str, ...] = ()) -> ServedModel:
    model_dir = tmp_path_factory.mktemp(name)
    write_image_model(model_dir, seed=3)
    log = tmp_path_factory.mktemp(f"{name}-log") / "server.log"
    server = ServedModel(model_dir, zipar_window=4, extra_args=(*SERVER_ARGS, *extra), log_path=log)
    server.start()
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    flags = ("--drain-timeout", str(DRAIN), "--request-body-timeout", str(BODY_TIMEOUT))
    server = start_server(tmp_path_factory, "faults", flags)
    yield server
    server.stop()


def post(server, body, timeout=120.0, headers=None) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **(headers or {})}
    return httpx.post(server.url + ROUTE, content=raw, headers=headers, timeout=timeout)


def error_of(response: httpx.Response, status: int) -> dict:
    """The OpenAI error body of a response (and nothing else in it)."""
    assert response.status_code == status, response.text[:300]
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert isinstance(error["code"], str) and len(error["message"]) <= 300, error
    return error


def raw_request(server, head_extra: str, body: bytes, content_length: int) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=MARGIN)
    head = f"POST {ROUTE} HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {content_length}\r\n{head_extra}\r\n"
    sock.sendall(head.encode() + body)
    return sock


def read_status(sock: socket.socket) -> tuple[int, str]:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    text = data.decode(errors="replace")
    return int(text.split(" ", 2)[1]), text


def read_response(sock: socket.socket) -> httpx.Response:
    """The whole HTTP response on `sock` (the route's answers carry a Content-Length); status 0 and an empty
    body when the server closed the connection without answering."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return httpx.Response(0, content=data)
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
    length = int(dict((k.lower(), v) for k, v in headers).get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return httpx.Response(int(lines[0].split(" ", 2)[1]), headers=headers, content=body)


def send_all(server, bodies: list[dict]) -> list[socket.socket]:
    """Each body on a connection of its own, written whole from this thread, in order: no client thread
    can connect or send late on a loaded machine."""
    raw = [json.dumps(body).encode() for body in bodies]
    return [raw_request(server, "", body, len(body)) for body in raw]


def outcomes_of(sockets: list[socket.socket]) -> list[httpx.Response]:
    try:
        return [read_response(sock) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


BIG = 10_000
ERRORS = [  # (body, param, code): every one was a 5xx, another schema, or a 200 before
    ({"prompt": "1", "temperature": 3}, "temperature", "invalid_value"),  # vLLM's BadRequestError, code 400
    ({"prompt": "1", "zipar_window": 2**64}, "zipar_window", "invalid_value"),  # vLLM's param "extra_args"
    ({"prompt": "1", "zipar_window": 65}, "zipar_window", "invalid_value"),  # beyond the 8x8 grid
    ({"prompt": "1", "cfg_scale": 1e308}, "cfg_scale", "invalid_value"),  # was 200 with a blank image
    (b'{"prompt": "1", "cfg_scale": 1e999}', "cfg_scale", "invalid_type"),  # JSON's infinity
    ({"prompt": "1", "cfg_interval": 10**30}, "cfg_interval", "invalid_value"),
    ({"prompt": "1", "top_k": 10**12}, "top_k", "invalid_value"),
    ({"prompt": "1", "seed": 2**53}, "seed", "invalid_value"),
    ({"prompt": "1", "seed": -1}, "seed", "invalid_value"),
    ({"prompt": "x" * BIG}, "prompt", "unknown_class"),  # echoed in full before
    ({"prompt": "1", "x" * BIG: 1}, "x" * 40, "unknown_parameter"),
    ({"prompt": "1", "n": "y" * BIG}, "n", "invalid_type"),
]


@pytest.mark.parametrize("body, param, code", ERRORS, ids=[e[2] + "-" + e[1][:12] for e in ERRORS])
def test_bad_values_get_our_400_with_a_short_message(server, body, param, code):
    error = error_of(post(server, body), 400)
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_get_405_in_the_openai_schema(server, method):
    response = httpx.request(method, server.url + ROUTE, timeout=30)
    assert error_of(response, 405)["code"] == "method_not_allowed"
    assert response.headers["allow"] == "POST"


def test_a_non_json_content_type_gets_415(server):
    response = post(server, b"prompt=1", headers={"content-type": "application/x-www-form-urlencoded"})
    assert error_of(response, 415)["code"] == "unsupported_media_type"


def test_an_oversized_body_gets_413_without_being_read(server):
    announced = raw_request(server, "", b'{"prompt": "', 50 << 20)  # announces 50 MiB, sends 12 bytes
    status, text = read_status(announced)
    announced.close()
    assert status == 413 and '"code":"request_too_large"' in text
    body = json.dumps({"prompt": "x" * (50 << 20)}).encode()
    response = post(server, body)  # sent in full: refused from its length, answered with a short body
    assert error_of(response, 413)["code"] == "request_too_large" and len(response.content) < 300

    def chunks():  # no Content-Length: counted while read
        for _ in range(100):
            yield b"x" * 4096

    streamed = httpx.post(server.url + ROUTE, content=chunks(), timeout=60)
    assert error_of(streamed, 413)["code"] == "request_too_large"
    assert server.healthy()


def test_a_body_that_stops_arriving_gets_408(server):
    sock = raw_request(server, "", b'{"prompt": ', 100)  # 11 of 100 bytes, then nothing
    status, text = read_status(sock)
    sock.close()
    assert status == 408 and '"code":"request_timeout"' in text


def test_a_client_that_leaves_mid_body_logs_one_info_line(server):
    before = server.log_tail(10**7).count("client disconnected while sending its body")
    sock = raw_request(server, "", b'{"prompt": ', 100)
    time.sleep(0.2)
    sock.close()
    deadline = time.monotonic() + MARGIN
    while time.monotonic() < deadline:
        log = server.log_tail(10**7)
        if log.count("client disconnected while sending its body") == before + 1:
            break
        time.sleep(0.2)
    assert log.count("client disconnected while sending its body") == before + 1
    assert "ClientDisconnect" not in log and "Traceback" not in log


def test_an_abort_storm_leaves_no_kv_blocks(server):
    def leave_mid_image(i):
        body = json.dumps({**HEAVY, "n": 4, "seed": i}).encode()
        with raw_request(server, "", body, len(body)):
            time.sleep(0.05)

    def leave_mid_stream(i):
        body = {**LIGHT, "stream": True, "partial_images": 2, "n": 4, "decoding": "ntp", "seed": i}
        with httpx.stream("POST", server.url + ROUTE, json=body, timeout=MARGIN) as response:
            next(response.iter_lines())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(leave_mid_image, range(24)))
        list(pool.map(leave_mid_stream, range(8)))
    assert server.idle_kv_usage(timeout=MARGIN) == 0.0
    assert len(post(server, LIGHT).json()["data"]) == 1


def test_start_up_logs_no_chat_template_traceback(server):
    log = server.log_tail(10**7)
    assert "Chat template warmup failed" not in log and "Traceback" not in log


# Behind the draining server's one engine slot a guided 8x8 NTP image takes ~0.15 s on this machine (idle),
# and the API server accepts a heavy request (10 images) in ~20 ms. The light request's 8 images then
# outlast the heavy requests' acceptance (~3x), and what is left of them needs a tenth of the drain; the
# heavy requests' 240 images need ~4x the drain. Each margin holds whatever the load, as long as the
# machine is less than ~10x slower (or ~4x faster) than this one idles.
LONG_DRAIN = 8.0
LIGHT_STREAM = {**HEAVY, "n": 8, "stream": True, "partial_images": 1}  # its first partial: it is decoding
HEAVY_REQUESTS = 24


@pytest.fixture
def draining_server(tmp_path_factory):
    """A server of its own with 1 engine slot: the heavy requests below then outlast the drain (behind the
    module server's 16 slots an idle machine finished them before the SIGTERM)."""
    flags = ("--drain-timeout", str(LONG_DRAIN), "--max-num-seqs", "1")
    server = start_server(tmp_path_factory, "draining", flags)
    yield server
    server.stop()


def test_sigterm_drains_then_exits(draining_server):
    """SIGTERM ends the server.

    A light request that is decoding when SIGTERM comes finishes inside the drain; the heavy ones (240
    guided NTP images behind 1 slot) cannot, and fail with a 503 once the drain time
    is over; a request arriving meanwhile gets 503 and `Retry-After` at once. The process exits 0, with
    neither tracebacks nor nanobind's leak report in its log.

    Nothing here races the machine's speed: the light request streams, so it is known to be decoding (its
    first partial image came) before the heavy ones are sent; they are written whole from this thread, and
    SIGTERM waits until the route has accepted all of them (its own counter, not vLLM's request gauges,
    which move with engine outputs and lagged by seconds on a loaded machine)."""
    server = draining_server
    with httpx.stream("POST", server.url + ROUTE, json=LIGHT_STREAM, timeout=MARGIN) as light:
        assert light.status_code == 200
        events = sse_events(light)
        first = next(events)
        assert first["type"] == "image_generation.partial_image", first
        heavy = send_all(server, [{**HEAVY, "seed": i} for i in range(HEAVY_REQUESTS)])
        accepted = wait_until_accepted(server, 1 + len(heavy))
        assert accepted == 1 + len(heavy), f"only {accepted} requests accepted in {MARGIN} s"
        # The arrival's connection is opened now, its request sent after SIGTERM: new TCP connections to
        # the loopback server were sometimes refused or held for seconds right after SIGTERM in fresh-clone
        # runs, while the listener stayed up with an empty queue (see the closing note of issue 22).
        arrival_socket = socket.create_connection((server.host, server.port), timeout=MARGIN)
        server.process.send_signal(signal.SIGTERM)
        sent_at = time.monotonic()
        time.sleep(0.2)
        body = json.dumps(LIGHT).encode()
        head = f"POST {ROUTE} HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/json\r\n"
        arrival_socket.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        (arrival,) = outcomes_of([arrival_socket])
        error = error_of(arrival, 503)
        assert error["code"] == "server_shutting_down" and error["type"] == "server_error"
        assert 1 <= int(arrival.headers["retry-after"]) <= LONG_DRAIN
        rest = list(events)
    completed = [e["image_index"] for e in rest if e["type"] == "image_generation.completed"]
    assert sorted(completed) == list(range(LIGHT_STREAM["n"])), [e["type"] for e in rest]
    outcomes = outcomes_of(heavy)
    assert time.monotonic() - sent_at <= LONG_DRAIN + MARGIN
    cut = [r for r in outcomes if r.status_code != 200]
    assert cut, "every heavy request finished inside the drain: nothing was cut off"
    for response in cut:
        assert error_of(response, 503)["code"] == "server_shutting_down"
    assert server.process.wait(timeout=MARGIN) == 0
    log = server.log_tail(10**7)
    # The light request was still decoding at SIGTERM: the drain started with every request.
    assert f"[shutdown] SIGTERM: draining {1 + len(heavy)} image request(s)" in log
    assert f"[shutdown] drain time over: failing {len(cut)} image request(s)" in log
    assert "nanobind" not in log and "Traceback" not in log, log[-3000:]


def sse_events(response: httpx.Response):
    """The JSON events of a server-sent event stream, as they arrive."""
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: ") :])


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def engine_core_of(server: ServedModel) -> psutil.Process:
    children = psutil.Process(server.process.pid).children()
    return next(child for child in children if child.name().startswith("VLLM::EngineCor"))


def wait_until_accepted(server: ServedModel, requests: int) -> int:
    """Until the route has accepted `requests` requests in all, at most MARGIN seconds; returns the last
    count seen. A `/metrics` answer that is late on a loaded machine is asked again."""
    deadline = time.monotonic() + MARGIN
    seen = 0
    while time.monotonic() < deadline:
        try:
            seen = int(server.metric("vllm:zipar_image_requests_accepted_total"))
        except (OSError, KeyError):  # a timeout, or nothing accepted yet since the start
            seen = 0
        if seen >= requests:
            break
        time.sleep(0.1)
    return seen


def kill_engine_under_load(tmp_path_factory, attempt: int):
    """Start a server, send 48 heavy requests, SIGKILL the engine core once the route accepted all;
    returns the server (stopped or stopping) and the responses."""
    # One engine slot: the heavy requests then outlast the wait even on an idle machine.
    server = start_server(tmp_path_factory, f"engine-death-{attempt}", ("--max-num-seqs", "1"))
    try:
        inflight = send_all(server, [{**HEAVY, "seed": i} for i in range(48)])
        accepted = wait_until_accepted(server, len(inflight))
        assert accepted == len(inflight), f"only {accepted} requests accepted in {MARGIN} s"
        core = engine_core_of(server)
        server.engine_workers = core.children(recursive=True)
        core.send_signal(signal.SIGKILL)
        return server, outcomes_of(inflight)
    except BaseException:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
        raise


def test_a_killed_engine_core_fails_requests_and_exits_non_zero(tmp_path_factory):
    # Every image finishing before the kill (a machine far faster than this one) tests nothing: that attempt
    # is run again on a fresh server (at most three times).
    for attempt in range(3):
        server, outcomes = kill_engine_under_load(tmp_path_factory, attempt)
        failed = [r for r in outcomes if r.status_code != 200]  # some may have finished before the kill
        if failed:
            break
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
    try:
        assert failed, "every image finished before the kill, three times"
        for response in failed:
            # 503 engine_dead; or 408 when the starved API loop (issue 22) read a body too late, before the
            # death: still a clear error body, never a dropped connection or a 500.
            code = 408 if response.status_code == 408 else 503
            assert error_of(response, code)["code"] == ("request_timeout" if code == 408 else "engine_dead")
        status = server.process.wait(timeout=MARGIN)
        assert status != 0  # vLLM alone exits 0 here: a supervisor would not restart it
        # The dead engine core's workers (orphans) outlived the server by seconds: now they are killed first.
        assert server.engine_workers and not any(alive(worker) for worker in server.engine_workers)
        # The log counts the failed images, also those that failed before the watcher saw the death.
        died = re.search(r"the engine core died: (\d+) image request\(s\) failed", server.log_tail(10**7))
        assert died is not None and int(died.group(1)) > 0
    finally:
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()
