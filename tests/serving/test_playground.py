"""The browser playground in a real headless Chromium (Debian's, driven by Playwright) against `vllm serve`.

One server on the shipped digits model for the module. The page streams partial images from the images API
and paints them: at least three distinct partial frames before the final one, with pass counts rising to the
engine's; the final canvas holds exactly the API's pixels for the same seed and settings; race mode runs NTP
and ZipAR side by side; a bad prompt shows the server's error message. Screenshots are test artifacts in
out/playground/ (paths printed; docs/images/playground.png is the race one). Playwright's own browser
download is not reachable here: scripts/install.sh installs Debian's `chromium`, launched through
`executable_path`.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serving.conftest import SERVER_ARGS
from vllm_zipar.serving.served_model import ServedModel
from vllm_zipar.zipar.plan import zipar_steps

pytestmark = [pytest.mark.serving, pytest.mark.timeout(600)]

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "digits"
ARTIFACTS = REPO / "out" / "playground"
MODEL = "digits"
GRID = 16
WAIT_MS = 180_000  # for one generation on a busy 2-core machine; nothing else waits on wall-clock time


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("playground_log") / "server.log"
    served = ServedModel(
        DIGITS, zipar_window=8, served_model_name=MODEL, extra_args=SERVER_ARGS, log_path=log
    )
    with served:
        yield served


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install.sh as root (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"], timeout=60_000
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1000, "height": 760})
    page.set_default_timeout(WAIT_MS)
    page.goto(server.url + "/")  # the address the server prints redirects to /playground
    page.wait_for_function("window.zipar && window.zipar.ready")
    yield page
    page.close()


def fill(
    page,
    *,
    prompt: str,
    seed: int,
    window: int = 4,
    decoding: str = "zipar",
    frames: int = 16,
    race: bool = False,
) -> None:
    page.fill("#prompt", prompt)
    page.check("input[name=mode][value=race]" if race else "input[name=mode][value=single]")
    page.select_option("#decoding", decoding)
    set_range = "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }"
    page.eval_on_selector("#window", set_range, window)
    page.fill("#seed", str(seed))
    page.fill("#n", "1")
    page.fill("#frames", str(frames))


def generate(page) -> list[dict]:
    page.click("#generate")
    page.wait_for_function("!zipar.busy && zipar.runs.length > 0 && zipar.runs.every(r => r.done)")
    return page.evaluate(
        "zipar.runs.map(r => ({title: r.title, decoding: r.decoding, error: r.error, frames: r.frames, stats:"
        " Object.fromEntries([...r.section.querySelectorAll('dd')].map(d => [d.className, d.textContent]))}))"
    )


def canvas_rgb(page, run: int) -> np.ndarray:
    data = page.evaluate(
        """(i) => { const c = zipar.runs[i].canvases[0];
                    const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    return [c.width, c.height, Array.from(data)]; }""",
        run,
    )
    width, height, rgba = data
    return np.array(rgba, dtype=np.uint8).reshape(height, width, 4)[..., :3]


def api(server, body: dict) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/images/generations",
        content=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        timeout=WAIT_MS / 1000,
    )


def api_rgb(server, body: dict) -> np.ndarray:
    response = api(server, body)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    return np.array(image.convert("RGB"))


def check_streamed(run: dict, passes: int) -> None:
    frames = run["frames"]
    assert frames and frames[-1]["final"] and not any(f["final"] for f in frames[:-1]), frames
    partial = frames[:-1]
    distinct = {f["checksum"] for f in partial} - {frames[-1]["checksum"]}
    assert len(distinct) >= 3, f"{len(distinct)} distinct partial frames painted before the final: {partial}"
    counts = [f["passes"] for f in frames]
    assert counts == sorted(counts) and counts[0] < passes and counts[-1] == passes, counts
    assert run["stats"]["passes"] == str(passes) and run["stats"]["state"] == "done", run["stats"]
    cells_per_pass = float(run["stats"]["cells-per-pass"])
    assert cells_per_pass == pytest.approx(GRID * GRID / passes, abs=0.01)


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=path, full_page=True)
    print(f"playground screenshot: {path}")


def test_page_streams_partial_frames_and_ends_on_the_apis_image(page, server):
    fill(page, prompt="seven", seed=3, window=4)
    (run,) = generate(page)
    assert run["error"] is None and run["title"] == "ZipAR-4"
    check_streamed(run, zipar_steps(GRID, GRID, 4, False))
    cfg = float(page.input_value("#cfg-scale"))  # the model's default, shown by the page
    expected = api_rgb(
        server,
        {
            "prompt": "seven",
            "seed": 3,
            "decoding": "zipar",
            "zipar_window": 4,
            "cfg_scale": cfg,
            "model": MODEL,
        },
    )
    shown = canvas_rgb(page, 0)
    assert shown.shape == expected.shape == (32, 32, 3)
    assert np.array_equal(shown, expected), f"{(shown != expected).any(-1).sum()} pixels differ"
    screenshot(page, "single.png")


def test_race_mode_runs_ntp_and_zipar_side_by_side_on_one_seed(page, server):
    fill(page, prompt="3", seed=5, window=4, race=True)
    ntp, zipar = generate(page)
    assert (ntp["title"], zipar["title"]) == ("NTP", "ZipAR-4")
    check_streamed(ntp, GRID * GRID)
    check_streamed(zipar, zipar_steps(GRID, GRID, 4, False))
    assert "fewer" in page.text_content(".summary")
    cfg = float(page.input_value("#cfg-scale"))
    body = {"prompt": "3", "seed": 5, "cfg_scale": cfg}
    assert np.array_equal(canvas_rgb(page, 0), api_rgb(server, {**body, "decoding": "ntp"}))
    zipar_body = {**body, "decoding": "zipar", "zipar_window": 4}
    assert np.array_equal(canvas_rgb(page, 1), api_rgb(server, zipar_body))
    screenshot(page, "race.png")


def test_a_bad_prompt_shows_the_servers_error_message(page, server):
    fill(page, prompt="dragon", seed=0)
    (run,) = generate(page)
    response = api(server, {"prompt": "dragon", "seed": 0, "stream": True})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "dragon" in message
    assert page.is_visible("#error") and page.text_content("#error") == message
    assert run["error"] == message and run["frames"] == []
