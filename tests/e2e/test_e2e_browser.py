"""The pages a browser opens, in a real chromium (Playwright driving the system's /usr/bin/chromium;
Playwright's own browser download is not used): the demo page at `/` against a real vqtok-serve
on models/default, and `/docs`, `/redoc` rendered with every request off the service aborted.

Without chromium these tests skip, except under CI (the `CI` variable set), where they fail:
.ci/run installs chromium first. Screenshots go to $VQTOK_TEST_ARTIFACTS (else the test's tmp
dir); VQTOK_UPDATE_SCREENSHOT=1 also writes docs/demo.png.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from e2e_support import DEFAULT_MODEL, REPO, Server, png, read_png, start_server

from training.data import pip_photos

CHROMIUM = Path(os.environ.get("VQTOK_CHROMIUM", "/usr/bin/chromium"))
PHOTO = "chelsea"  # a pip-bundled colour photo (scikit-image), 451×300
TIMEOUT_MS = 120_000  # models/default on a busy 2-core box
NO_PRE_STOP = {"VQTOK_PRE_STOP_DELAY_S": "0"}  # no load balancer to wait for at teardown


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; with CI set the browser tests must run, not skip")
    pytest.skip(reason)


try:
    from playwright.sync_api import Browser, Page, Route, sync_playwright
except ImportError:  # pragma: no cover - the dev extras install it
    sync_playwright = None


@pytest.fixture(scope="session", autouse=True)
def chromium() -> Path:
    # autouse, session scope: decided before any fixture starts a server or exports a model
    if sync_playwright is None:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.is_file():
        _unavailable(f"no chromium at {CHROMIUM} (apt-get install chromium, or set VQTOK_CHROMIUM)")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(chromium))
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def default_server() -> Iterator[Server]:
    running = start_server(DEFAULT_MODEL, env=NO_PRE_STOP, timeout=300)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def offline_page(browser: Browser) -> Iterator[tuple[Page, list[str]]]:
    """A page whose requests to anything but the service (127.0.0.1) are aborted and listed."""
    context = browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    blocked: list[str] = []

    def only_the_service(route: Route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_service)
    try:
        yield page, blocked
    finally:
        context.close()


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rgb = dict(pip_photos().images())[PHOTO]
    path = tmp_path_factory.mktemp("photo") / f"{PHOTO}.png"
    path.write_bytes(png(rgb))
    return path


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("VQTOK_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def api_answers(base_url: str, photo: Path) -> tuple[httpx.Response, dict[str, Any]]:
    """What the HTTP API says about `photo` (resize=fit, the page's default)."""
    upload = photo.read_bytes()
    with httpx.Client(base_url=base_url, timeout=120) as client:
        reconstructed = client.post(
            "/v1/reconstruct", files={"image": (photo.name, upload, "image/png")}
        )
        encoded = client.post("/v1/encode", files={"images": (photo.name, upload, "image/png")})
    assert reconstructed.status_code == 200 and encoded.status_code == 200, encoded.text
    return reconstructed, encoded.json()


def test_demo_page_shows_what_the_api_answers(
    default_server: Server, offline_page: tuple[Page, list[str]], photo: Path, artifacts: Path
) -> None:
    page, blocked = offline_page
    page.goto(default_server.base_url + "/")
    page.set_input_files("#file", photo)
    page.wait_for_selector("#result:not([hidden])")
    page.wait_for_function("document.getElementById('reconstruction').naturalWidth > 0")
    reconstructed, encoded = api_answers(default_server.base_url, photo)
    item = encoded["items"][0]
    h, w = item["shape"]

    assert page.inner_text("#psnr") == f"{reconstructed.headers['x-psnr-db']} dB"
    assert page.inner_text("#model-id") == reconstructed.headers["x-model-id"]
    assert "encode" in page.inner_text("#latency") and " ms" in page.inner_text("#latency")
    size = page.eval_on_selector("#reconstruction", "img => [img.naturalWidth, img.naturalHeight]")
    assert size == list(reversed(item["image_size"]))
    # the token grid: one canvas pixel per token, one colour per code
    canvas = page.eval_on_selector(
        "#token-grid",
        "c => [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, "
        "c.height).data)]",
    )
    assert canvas[:2] == [w, h]
    rgba = canvas[2]
    colours = [tuple(rgba[i : i + 3]) for i in range(0, len(rgba), 4)]
    codes = [code for row in item["tokens"] for code in row]
    colour_of = dict(zip(codes, colours))
    assert all(colour_of[code] == colour for code, colour in zip(codes, colours))
    assert len(set(colour_of.values())) == len(colour_of)  # different codes, different colours

    # hover names the code and its (row, col)
    row, col = h // 3, (2 * w) // 3
    box = page.locator("#token-grid").bounding_box()
    assert box is not None
    page.mouse.move(
        box["x"] + (col + 0.5) * box["width"] / w, box["y"] + (row + 0.5) * box["height"] / h
    )
    hover = page.inner_text("#token-hover")
    assert hover.startswith(f"code {item['tokens'][row][col]} at (row {row}, col {col})"), hover
    page.screenshot(path=artifacts / "demo.png")
    if os.environ.get("VQTOK_UPDATE_SCREENSHOT") == "1":
        page.screenshot(path=REPO / "docs" / "demo.png")
    page.mouse.move(0, 0)

    with page.expect_download() as download:
        page.click("#download")
    downloaded = json.loads(Path(download.value.path()).read_text())
    assert downloaded["items"][0]["tokens"] == item["tokens"]
    assert downloaded["model"] == encoded["model"]
    # ... and the downloaded tokens decode to the reconstruction the page showed
    decoded = httpx.post(
        default_server.base_url + "/v1/decode",
        json={"tokens": downloaded["items"][0]["tokens"], "model_id": downloaded["model"]["id"]},
        timeout=120,
    )
    assert decoded.status_code == 200, decoded.text
    np.testing.assert_array_equal(read_png(decoded.content), read_png(reconstructed.content))
    assert not blocked


def test_demo_page_shows_the_problem_detail_of_a_refused_upload(
    default_server: Server, offline_page: tuple[Page, list[str]], tmp_path: Path
) -> None:
    page, blocked = offline_page
    notes = tmp_path / "notes.txt"
    notes.write_text("these are notes, not pixels\n")
    api = httpx.post(
        default_server.base_url + "/v1/encode",
        files={"images": (notes.name, notes.read_bytes(), "text/plain")},
        timeout=60,
    )
    assert api.status_code == 415, api.text
    detail = api.json()["detail"]

    page.goto(default_server.base_url + "/")
    page.set_input_files("#file", notes)
    page.wait_for_selector("#error:not([hidden])")
    shown = page.inner_text("#error")
    assert detail in shown and "415" in shown, shown
    assert page.is_hidden("#result")
    assert not blocked


def test_demo_page_sends_the_api_key_it_is_given(
    e2e_model_dir: Path, offline_page: tuple[Page, list[str]], photo: Path
) -> None:
    key = "demo-page-key"
    keyed = start_server(e2e_model_dir, env={**NO_PRE_STOP, "VQTOK_API_KEY": key})
    try:
        page, blocked = offline_page
        refused = httpx.post(
            keyed.base_url + "/v1/reconstruct", files={"image": photo.read_bytes()}
        )
        assert refused.status_code == 401
        page.goto(keyed.base_url + "/")
        page.wait_for_function(
            "document.getElementById('model-card').textContent.includes('API key')"
        )
        page.set_input_files("#file", photo)
        page.wait_for_selector("#error:not([hidden])")
        assert refused.json()["detail"] in page.inner_text("#error")

        page.fill("#api-key", key)
        page.press("#api-key", "Tab")  # change: the page retries the refused photo with the key
        page.wait_for_selector("#result:not([hidden])")
        answer = httpx.post(
            keyed.base_url + "/v1/reconstruct",
            files={"image": photo.read_bytes()},
            headers={"X-API-Key": key},
            timeout=60,
        )
        assert page.inner_text("#psnr") == f"{answer.headers['x-psnr-db']} dB"
        assert answer.headers["x-model-id"] in page.inner_text("#model-card")
        assert page.is_hidden("#error")
        assert not blocked
    finally:
        keyed.stop()


def test_swagger_ui_renders_with_no_internet(
    default_server: Server, offline_page: tuple[Page, list[str]], artifacts: Path
) -> None:
    page, blocked = offline_page
    operations = _operation_count(default_server.base_url)
    page.goto(default_server.base_url + "/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert "vqtok" in page.inner_text(".swagger-ui .info .title")
    page.wait_for_selector(".opblock")
    assert page.locator(".opblock").count() == operations
    assert page.locator(".swagger-ui .errors-wrapper").count() == 0
    page.screenshot(path=artifacts / "docs.png")
    assert not blocked, blocked


def test_redoc_renders_with_no_internet(
    default_server: Server, offline_page: tuple[Page, list[str]], artifacts: Path
) -> None:
    page, blocked = offline_page
    operations = _operation_count(default_server.base_url)
    page.goto(default_server.base_url + "/redoc")
    page.wait_for_selector("h1")
    assert "vqtok" in page.inner_text("h1")
    sections = page.locator("[data-section-id^='operation/']")
    sections.first.wait_for()
    assert sections.count() == operations
    page.screenshot(path=artifacts / "redoc.png")
    assert not blocked, blocked


def _operation_count(base_url: str) -> int:
    document = httpx.get(base_url + "/openapi.json", timeout=30).json()
    return sum(len(operations) for operations in document["paths"].values())
