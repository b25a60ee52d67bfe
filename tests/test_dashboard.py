"""The /dashboard page in a real headless Chromium (Playwright), against a real router and real workers.

Needs Debian's ``chromium`` (/usr/bin/chromium) and the ``playwright`` Python package; Playwright's own
browser download is not used. Without either, the module is skipped. A screenshot of the page after the
playground ran is saved under pytest's tmp_path and, when ``VELESIO_ARTIFACTS`` names a folder, copied there.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import requests

from conftest import SMOLLM2, TOKEN

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("dashboard browser test needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
                allow_module_level=True)
if importlib.util.find_spec("playwright") is None:
    pytest.skip("dashboard browser test needs the playwright Python package (pip install playwright)",
                allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TEXT = {**SMOLLM2, "options": {"n_ctx": 1024, "n_threads": 1}}
TINY_SD = {"name": "tiny-sd", "backend": "diffusers", "slots": 1}
HAVE_DIFFUSERS = all(importlib.util.find_spec(m) for m in ("torch", "diffusers"))


@pytest.fixture(scope="module")
def dash(start_router, start_worker):
    """A router, text workers w-a and w-b, and (when diffusers is installed) an image worker img-1."""
    router = start_router()
    workers = {name: start_worker(router, name, [TEXT], wait=False) for name in ("w-a", "w-b")}
    if HAVE_DIFFUSERS:
        workers["img-1"] = start_worker(router, "img-1", [TINY_SD], wait=False)
    router.wait_workers(set(workers), timeout=120)
    return router, workers


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(browser, dash):
    context = browser.new_context(viewport={"width": 1360, "height": 1000}, device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors  # type: ignore[attr-defined]
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def worker_cards(page: Page):
    return page.locator("#workers [data-worker]")


def test_page_and_assets_are_public_and_the_api_is_not(dash):
    router, _ = dash
    for path, kind in (("/dashboard", "text/html"), ("/dashboard/app.js", "text/javascript"),
                       ("/dashboard/style.css", "text/css")):
        r = requests.get(router.url + path, timeout=10)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
        assert r.headers["Content-Type"].startswith(kind)
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]
        assert "http://" not in r.text and "https://" not in r.text, f"{path} references an external asset"
    r = requests.get(router.url + "/dashboard/", timeout=10, allow_redirects=False)
    assert r.status_code == 308 and r.headers["Location"] == "/dashboard"
    assert requests.get(router.url + "/dashboard/nope.js", timeout=10).status_code == 401
    assert requests.get(router.url + "/queue/status", timeout=10).status_code == 401


def test_token_form_then_both_workers_show(page: Page, dash):
    router, _ = dash
    page.goto(router.url + "/dashboard")
    expect(page.locator("#token")).to_be_visible()
    page.fill("#token", "wrong-token")
    page.click("#token-submit")
    expect(page.locator("#token-error")).to_be_visible()
    expect(page.locator("#app")).to_be_hidden()

    page.fill("#token", TOKEN)
    page.click("#token-submit")
    expect(page.locator("#app")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('velesio.token')") == TOKEN
    assert page.evaluate("localStorage.length") == 0
    assert TOKEN not in page.url

    for name in ("w-a", "w-b"):
        card = page.locator(f'#workers [data-worker="{name}"]')
        expect(card).to_be_visible()
        expect(card.locator(".model-name")).to_have_text("smollm2-135m-instruct")
        expect(card.locator(".host")).not_to_have_text("–")
        expect(card.locator(".device")).to_contain_text("cpu")
        expect(card.locator('[data-field="heartbeat"] .counter-value')).to_have_text(re.compile(r"^[0-9.]+ s$"))
    expect(page.locator('#queues tr[data-model="smollm2-135m-instruct"] td').nth(2)).to_have_text("2")
    expect(page.locator("#mesh-status")).to_have_text("healthy")

    # The token survives a reload of the tab (sessionStorage), so the page comes straight back.
    page.reload()
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator('#workers [data-worker="w-a"]')).to_be_visible()


def test_killed_worker_disappears_within_seconds(page: Page, dash):
    _, workers = dash
    expect(page.locator('#workers [data-worker="w-b"]')).to_be_visible()
    workers["w-b"].signal(signal.SIGKILL)
    killed = time.monotonic()
    expect(page.locator('#workers [data-worker="w-b"]')).to_have_count(0, timeout=5_000)
    assert time.monotonic() - killed < 5.5
    expect(page.locator('#workers [data-worker="w-a"]')).to_be_visible()
    expect(page.locator('#queues tr[data-model="smollm2-135m-instruct"] td').nth(2)).to_have_text("1")


def test_chat_streams_into_the_page(page: Page):
    # Record the reply's length at every DOM change: a streamed reply grows through several lengths.
    page.evaluate("""() => {
        window.__lengths = [];
        const log = document.querySelector('#chat-output');
        new MutationObserver(() => {
            const last = log.querySelector('[data-role="assistant"]:last-child .msg-text');
            if (last) window.__lengths.push(last.textContent.length);
        }).observe(log, {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#chat-max-tokens", "32")
    page.fill("#chat-temperature", "0")
    page.fill("#chat-input", "Write three short sentences about the sea.")
    page.click("#chat-send")
    expect(page.locator("#chat-form")).to_have_attribute("data-state", "done", timeout=60_000)

    reply = page.locator('#chat-output [data-role="assistant"] .msg-text').last
    text = reply.inner_text()
    assert text.strip() and not text.startswith("Error"), text
    lengths = [n for n in page.evaluate("window.__lengths") if n > 0]
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), f"the reply did not stream: {lengths}"
    expect(page.locator('#chat-output [data-role="user"]')).to_contain_text("about the sea")
    expect(page.locator("#chat-meta")).to_contain_text("chunk(s)")


def test_txt2img_shows_the_image(page: Page, dash):
    router, _ = dash
    live = router.get("/models").json()["image_models"]
    if not live:
        pytest.skip("no image model is live (diffusers is not installed here)")
    page.fill("#img-prompt", "a red square on a blue sky")
    page.fill("#img-width", "64")
    page.fill("#img-height", "64")
    page.fill("#img-steps", "2")
    page.click("#img-send")
    img = page.locator("#img-output img")
    expect(img).to_have_count(1, timeout=60_000)
    page.wait_for_function("document.querySelector('#img-output img').complete")
    assert img.evaluate("el => [el.naturalWidth, el.naturalHeight]") == [64, 64]
    assert img.get_attribute("src").startswith("data:image/png;base64,")
    expect(page.locator("#img-form")).to_have_attribute("data-state", "done")
    expect(page.locator("#img-meta")).to_contain_text("64×64")


def test_no_auth_router_opens_without_the_form(browser, start_router):
    router = start_router(token="", extra_args=["--no-auth"])
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(router.url + "/dashboard")
        expect(page.locator("#app")).to_be_visible()
        expect(page.locator("#login")).to_be_hidden()
        expect(page.locator("#workers-empty")).to_be_visible()
        expect(page.locator("#mesh-status")).to_have_text("degraded")
    finally:
        context.close()


def test_screenshot(page: Page, tmp_path: Path):
    expect(page.locator("#app")).to_be_visible()
    assert not page.js_errors, page.js_errors  # type: ignore[attr-defined]
    page.wait_for_timeout(300)  # let one more poll land
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    target = os.environ.get("VELESIO_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / "dashboard.png")
