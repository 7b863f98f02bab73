"""Request-head limits of the HTTP server: too large or too many headers get 431, a stalled head is closed.

First uvicorn alone, in this process, with each of its two HTTP/1.1 protocols wrapped
(`serving/http_limits.py`: httptools, which vLLM's server uses here, and h11, used when httptools is not
installed), small limits and a trivial app; then one real `vllm serve`, whose limits come from our flags and
vLLM's `--h11-max-header-count`. Raw sockets throughout: HTTP clients refuse to send such heads. Times are
bounded generously (this machine is shared) and never compared with each other.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvloop

from tests.serving.conftest import SERVER_ARGS, write_image_model
from vllm_zipar.serving.http_limits import HeadLimits, head_limits_from_env, limited_protocol_class
from vllm_zipar.serving.served_model import ServedModel, free_port

pytestmark = pytest.mark.serving

MARGIN = 30.0  # bounds every wait for an answer: generous for a loaded machine, far below "never"
LIMITS = HeadLimits(max_bytes=4096, max_count=20, timeout=1.0)
KEEP_ALIVE = 10  # seconds: far longer than LIMITS.timeout
BLOCK_SECONDS = 3 * LIMITS.timeout


async def echo_app(scope, receive, send) -> None:
    """200 with the number of headers and body bytes it got."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    answer = json.dumps({"headers": len(scope["headers"]), "body": len(body)}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(answer)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": answer})


class InProcessServer:
    """uvicorn on loopback in a thread of its own, speaking `protocol` with LIMITS."""

    def __init__(self, protocol: str) -> None:
        import uvicorn

        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        http = limited_protocol_class(protocol, LIMITS)
        assert http is not None
        config = uvicorn.Config(
            echo_app,
            host=self.host,
            port=self.port,
            http=http,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_keep_alive=KEEP_ALIVE,
        )
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        # uvloop, as vLLM's server (it runs due timers before it polls sockets again).
        self.thread = threading.Thread(target=lambda: uvloop.run(self.serve()), daemon=True)

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve()

    def stall_loop(self, seconds: float) -> socket.socket:
        """From now on, a byte written to the returned socket stalls the server's loop for `seconds` inside
        an I/O callback (as a slow callback or a descheduled process would)."""
        ours, theirs = socket.socketpair()

        def stall() -> None:
            if not theirs.recv(1):  # `ours` closed: done
                assert self.loop is not None
                self.loop.remove_reader(theirs.fileno())
                theirs.close()
                return
            time.sleep(seconds)

        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.loop.add_reader, theirs.fileno(), stall)
        return ours

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + MARGIN
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(MARGIN)


@pytest.fixture(scope="module", params=["httptools", "h11"])
def uvicorn_server(request) -> Iterator[InProcessServer]:
    with InProcessServer(request.param) as server:
        yield server


def connect(server) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=MARGIN)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (status, headers, body by Content-Length); raises ConnectionError on EOF before it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response; got {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split(" ", 2)[1]), headers, body


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes the connection (EOF or reset) within MARGIN, reading what it sends."""
    sock.settimeout(MARGIN)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def request_bytes(
    host: str, path: str = "/", headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def assert_refused_with_431(sock: socket.socket, words: str) -> dict:
    status, headers, body = read_response(sock)
    assert status == 431, body[:300]
    assert headers["connection"] == "close" and headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == "request_header_fields_too_large" and error["type"] == "invalid_request_error"
    assert words in error["message"], error
    assert closed_by_server(sock)
    return error


def assert_serves(server) -> None:
    with connect(server) as sock:
        sock.sendall(request_bytes(server.host, body=b"{}"))
        status, _, body = read_response(sock)
    assert status == 200 and json.loads(body)["body"] == 2


# ---------------------------------------------------------------- flags


def test_the_flags_reach_the_limits_through_the_environment(tmp_path):
    """`vllm serve --max-header-bytes/--request-header-timeout` -> environment -> HeadLimits; the count is
    vLLM's `--h11-max-header-count`, passed to `serve_http`."""
    from vllm_zipar.serving.vllm_command import CommandError, serve_argv
    from vllm_zipar.testing.llamagen_dirs import write_random_model_dir

    write_random_model_dir(
        tmp_path, with_vq=False, dim=64, n_layer=1, n_head=2, codebook_size=64, grid_size=4
    )
    env: dict[str, str] = {}
    flags = ["--max-header-bytes", "8192", "--request-header-timeout=2.5", "--h11-max-header-count", "64"]
    argv = serve_argv(["serve", str(tmp_path), "--decoding", "ntp", *flags], env)
    assert "--max-header-bytes" not in argv and "--request-header-timeout=2.5" not in argv
    assert value_after(argv, "--h11-max-header-count") == "64"  # vLLM's own flag, left to vLLM
    assert head_limits_from_env(64, env) == HeadLimits(max_bytes=8192, max_count=64, timeout=2.5)
    assert head_limits_from_env(None, {}) == HeadLimits(32 << 10, 256, 10.0)
    with pytest.raises(CommandError, match="--request-header-timeout"):
        serve_argv(["serve", str(tmp_path), "--decoding", "ntp", "--request-header-timeout", "0"], {})


def value_after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# ---------------------------------------------------------------- uvicorn alone, both protocols


def test_a_small_head_with_a_body_larger_than_the_head_limit_is_served(uvicorn_server):
    """Only the head counts: a 100 KB body, its first half in the head's write, is not taken for headers."""
    body = b"x" * 100_000
    with connect(uvicorn_server) as sock:
        sock.sendall(request_bytes(uvicorn_server.host, headers={"X-Many": "a"}, body=body)[:-50_000])
        time.sleep(0.2)  # the rest in a later read: the head is complete, the request is not
        sock.sendall(body[-50_000:])
        status, _, answer = read_response(sock)
    assert status == 200 and json.loads(answer)["body"] == len(body)


def test_an_oversized_header_gets_431_and_the_server_keeps_serving(uvicorn_server):
    with connect(uvicorn_server) as sock:
        sock.sendall(request_bytes(uvicorn_server.host, headers={"X-Big": "y" * 8000}))
        error = assert_refused_with_431(sock, "larger than this server's limit of 4096 bytes")
    assert "--max-header-bytes" in error["message"]
    assert_serves(uvicorn_server)


def test_a_head_growing_past_the_limit_is_refused_before_it_ends(uvicorn_server):
    """A header line that never ends: refused once the limit's worth arrived, not buffered on."""
    with connect(uvicorn_server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"z" * 6000)
        assert_refused_with_431(sock, "bytes so far")
    assert_serves(uvicorn_server)


def test_too_many_headers_get_431(uvicorn_server):
    headers = {f"X-H{i}": "v" for i in range(LIMITS.max_count + 5)}
    with connect(uvicorn_server) as sock:
        sock.sendall(request_bytes(uvicorn_server.host, headers=headers))
        assert_refused_with_431(sock, f"more than {LIMITS.max_count} headers")
    assert_serves(uvicorn_server)


def test_as_many_headers_as_allowed_are_served(uvicorn_server):
    headers = {f"X-H{i}": "v" for i in range(LIMITS.max_count - 2)}  # plus Host and Content-Length
    with connect(uvicorn_server) as sock:
        sock.sendall(request_bytes(uvicorn_server.host, headers=headers))
        status, _, body = read_response(sock)
    assert status == 200 and json.loads(body)["headers"] == LIMITS.max_count


def test_a_head_that_stalls_gets_408_and_is_closed(uvicorn_server):
    with connect(uvicorn_server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        status, headers, body = read_response(sock)
        assert status == 408 and headers["connection"] == "close", body[:300]
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert closed_by_server(sock)
    assert_serves(uvicorn_server)


def test_a_connection_that_sends_nothing_is_closed(uvicorn_server):
    with connect(uvicorn_server) as sock:
        assert closed_by_server(sock)


def test_an_idle_keep_alive_connection_is_left_to_the_keep_alive_timeout(uvicorn_server):
    """Between requests the header timeout does not run: a second request after 3x its time is served."""
    with connect(uvicorn_server) as sock:
        sock.sendall(request_bytes(uvicorn_server.host, body=b"{}"))
        assert read_response(sock)[0] == 200
        time.sleep(3 * LIMITS.timeout)  # KEEP_ALIVE is 10 s
        sock.sendall(request_bytes(uvicorn_server.host, body=b"{}"))
        assert read_response(sock)[0] == 200


def test_a_head_sent_in_time_is_read_even_when_the_loop_ran_late(uvicorn_server):
    """A connection opens, the loop stalls past the header timeout, the head arrives meanwhile: when the
    loop runs again the overdue timer must not close a connection whose head is waiting to be read."""
    stall = uvicorn_server.stall_loop(BLOCK_SECONDS)
    with connect(uvicorn_server) as waiting:
        time.sleep(0.3)  # `waiting` is accepted: its header timer runs
        stall.send(b"x")
        time.sleep(0.4 * BLOCK_SECONDS)  # the loop is stalled now, past the head's deadline
        waiting.sendall(request_bytes(uvicorn_server.host, body=b"{}"))
        assert read_response(waiting)[0] == 200
    stall.close()


# ---------------------------------------------------------------- one real server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("http-limits")
    write_image_model(model_dir, seed=3)
    log = tmp_path_factory.mktemp("http-limits-log") / "server.log"
    flags = ("--max-header-bytes", "16384", "--request-header-timeout", "2")
    served = ServedModel(model_dir, zipar_window=4, extra_args=(*SERVER_ARGS, *flags), log_path=log)
    served.start()
    yield served
    served.stop()


ROUTE = "/v1/images/generations"
LIGHT = json.dumps({"prompt": "3", "seed": 1}).encode()


def test_vllm_server_refuses_large_and_numerous_heads_and_closes_stalled_ones(server):
    """vLLM's server speaks httptools here; a 64 KiB header and 300 headers (vLLM's count limit: 256) get
    431, a stalled head is closed after our 2 s, and image requests are served before and after."""
    assert "LimitedHttpToolsProtocol" in server.log_tail(10**7)
    json_type = {"Content-Type": "application/json"}
    with connect(server) as sock:
        sock.sendall(request_bytes(server.host, ROUTE, {**json_type, "X-Big": "y" * (64 << 10)}, LIGHT))
        assert_refused_with_431(sock, "limit of 16384 bytes")
    many = {**json_type, **{f"X-H{i}": "v" for i in range(300)}}
    with connect(server) as sock:
        sock.sendall(request_bytes(server.host, ROUTE, many, LIGHT))
        assert_refused_with_431(sock, "more than 256 headers")
    with connect(server) as sock:
        sock.sendall(f"POST {ROUTE} HTTP/1.1\r\nHost: {server.host}\r\n".encode())
        status, _, body = read_response(sock)
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
        assert closed_by_server(sock)
    with connect(server) as sock:  # a normal request on a raw socket, then over httpx
        sock.sendall(request_bytes(server.host, ROUTE, json_type, LIGHT))
        status, _, body = read_response(sock)
        assert status == 200 and len(json.loads(body)["data"]) == 1
    response = httpx.post(server.url + ROUTE, content=LIGHT, headers=json_type, timeout=MARGIN * 4)
    assert response.status_code == 200
    assert httpx.get(server.url + "/health", timeout=MARGIN).status_code == 200
