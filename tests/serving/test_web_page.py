"""The web chat page at /: a single offline file, tested in a real headless Chromium (Debian's chromium,
driven by Playwright; no browser is downloaded). Load the page, attach (and paste) an image, see streamed
text appear, stop a generation (its KV blocks are freed), keep a multi-turn conversation, start over."""

from __future__ import annotations

import base64
import json
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from internvl_runtime.serving.config import ServerConfig

from .helpers import png_bytes, run_server

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
# A closed network makes Chromium hang on its background services unless they are switched off.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGE = Path(__file__).resolve().parents[2] / "internvl_runtime" / "serving" / "static" / "index.html"


# ---------------------------------------------------------------------------------------------------
# Static checks (no browser)
# ---------------------------------------------------------------------------------------------------


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href", "action") and value:
                self.refs.append(value)


def test_page_is_self_contained():
    html = PAGE.read_text(encoding="utf-8")
    parser = _Refs()
    parser.feed(html)
    assert parser.refs == []                                  # no script, style, font or image from anywhere
    assert "http://" not in html and "https://" not in html and "//cdn" not in html.lower()
    assert not re.search(r"\bimport\s*\(|@import", html)


# ---------------------------------------------------------------------------------------------------
# In a real browser
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_1b):
    config = ServerConfig(model=str(tiny_1b), max_model_len=2048, num_blocks=1024, max_tiles_per_image=2)
    with run_server(config) as running:
        yield running


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (CI installs it: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    profile = tmp_path_factory.mktemp("chromium-profile")          # a fresh --user-data-dir
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield context
        finally:
            context.close()


def test_page_served_with_csp(server):
    response = httpx.get(server.base_url + "/")
    assert response.status_code == 200 and "<title>InternVL chat</title>" in response.text
    assert "default-src 'self'" in response.headers["content-security-policy"]


def wait_idle(server, before: dict) -> dict:
    deadline = time.monotonic() + 20
    while True:
        after = server.metrics()
        if after["internvl_queue_length"] == 0 and after["internvl_kv_blocks_in_use"] == 0:
            return after
        assert time.monotonic() < deadline, after
        time.sleep(0.05)


def test_chat_in_the_browser(server, browser_context, tmp_path):
    from playwright.sync_api import expect

    image = tmp_path / "red.png"
    image.write_bytes(png_bytes(64, 48, (220, 20, 20)))
    page = browser_context.new_page()
    page.set_default_timeout(15_000)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    sent: list[dict] = []
    extra: dict = {}

    def capture(route):
        body = json.loads(route.request.post_data)
        sent.append(body)
        body.update(extra)
        route.continue_(post_data=json.dumps(body))

    page.route("**/v1/chat/completions", capture)
    page.goto(server.base_url + "/")
    page.wait_for_selector("#status.ready", timeout=20_000)
    assert page.text_content("#model") == "tiny-1B"
    page.click("#settings-toggle")
    page.fill("#max-tiles", "1")
    page.fill("#max-tokens", "8")

    # 1. attach an image, send, see the streamed answer
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#attachments img")
    page.fill("#input", "What is in this image?")
    page.click("#send")
    page.wait_for_selector(".msg.assistant.done", timeout=30_000)
    assert page.locator(".msg.user .images img").count() == 1
    assert page.locator("#attachments img").count() == 0                    # attachments moved to the message
    first_answer = page.text_content(".msg.assistant .text")
    assert first_answer
    assert re.search(r"done|max tokens", page.text_content(".msg.assistant .meta"))
    user_parts = sent[0]["messages"][0]["content"]
    assert sent[0]["stream"] is True and sent[0]["max_dynamic_patch"] == 1
    assert [p["type"] for p in user_parts] == ["text", "image_url"]
    assert user_parts[1]["image_url"]["url"].startswith("data:image/png;base64,")

    # 2. a second turn (multi-turn: history with the earlier image), long enough to stop it midway
    before = server.metrics()
    extra.update(max_tokens=1500, min_tokens=1500)
    page.fill("#input", "Tell me more, at length.")
    page.press("#input", "Enter")
    # streamed text appears while the answer is still streaming (the page runs under its own CSP: no eval,
    # so this waits on a selector rather than a JS predicate)
    page.wait_for_selector(".msg.assistant.streaming .text:not(:empty)", timeout=30_000)
    assert page.is_enabled("#stop") and not page.is_enabled("#send")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant.stopped", timeout=10_000)
    assert page.text_content(".msg.assistant.stopped .meta") == "stopped"
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    second = sent[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[0]["content"][1]["type"] == "image_url" and second[1]["content"] == first_answer
    after = wait_idle(server, before)                                   # the stop freed the KV blocks
    assert after["internvl_requests_aborted_total"] == before["internvl_requests_aborted_total"] + 1
    assert after["internvl_generation_tokens_total"] - before["internvl_generation_tokens_total"] < 1500

    # 3. the stopped answer stays in the conversation; then start over
    extra.clear()
    page.fill("#input", "Third turn")
    page.click("#send")
    expect(page.locator(".msg.assistant.done")).to_have_count(3, timeout=30_000)
    assert [m["role"] for m in sent[2]["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.fill("#input", "Fresh start")
    page.click("#send")
    page.wait_for_selector(".msg.assistant.done", timeout=30_000)
    assert [m["role"] for m in sent[3]["messages"]] == ["user"]
    assert page.locator(".msg.error").count() == 0

    # 4. paste an image from the clipboard
    encoded = base64.b64encode(png_bytes(30, 30, (0, 0, 200))).decode()
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'pasted.png', { type: 'image/png' }));
        document.getElementById('input').dispatchEvent(new ClipboardEvent('paste', { clipboardData: data,
                                                                                      bubbles: true }));
    }""", encoded)
    page.wait_for_selector("#attachments img")
    page.fill("#input", "And this?")
    page.click("#send")
    expect(page.locator(".msg.assistant.done")).to_have_count(2, timeout=30_000)
    assert sent[4]["messages"][-1]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")

    # nothing was fetched from anywhere but this server
    assert requests and all(url.startswith(server.base_url) for url in requests), requests
    page.close()


def test_errors_are_shown(server, browser_context):
    page = browser_context.new_page()
    page.route("**/v1/chat/completions",
               lambda route: route.continue_(post_data=json.dumps({**json.loads(route.request.post_data),
                                                                   "temperature": 7})))
    page.goto(server.base_url + "/")
    page.wait_for_selector("#status.ready", timeout=20_000)
    page.fill("#input", "hello")
    page.click("#send")
    page.wait_for_selector(".msg.assistant.error", timeout=20_000)
    assert "temperature" in page.text_content(".msg.assistant.error .meta")
    assert page.is_enabled("#send")
    page.close()
