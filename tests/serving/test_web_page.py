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
STATIC = Path(__file__).resolve().parents[2] / "internvl_runtime" / "serving" / "static"
PAGE = STATIC / "index.html"


# ---------------------------------------------------------------------------------------------------
# Static checks (no browser)
# ---------------------------------------------------------------------------------------------------


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.inline_scripts = 0

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        if tag == "script" and not values.get("src"):
            self.inline_scripts += 1
        for name, value in attrs:
            if name in ("src", "href", "action") and value:
                self.refs.append(value)


def test_page_is_self_contained():
    """Everything the page loads is one of the package's own static files: no CDN, no inline script."""
    html = PAGE.read_text(encoding="utf-8")
    parser = _Refs()
    parser.feed(html)
    assert parser.refs and parser.inline_scripts == 0
    for ref in parser.refs:
        assert ref.startswith("/static/") and (STATIC / ref.removeprefix("/static/")).is_file(), ref
    own = [PAGE, STATIC / "style.css", *sorted((STATIC / "js").glob("*.js"))]
    for path in own:
        text = path.read_text(encoding="utf-8").replace('"http://www.w3.org/2000/svg"', "")   # a name, not a load
        assert "http://" not in text and "https://" not in text and "//cdn" not in text.lower(), path
        assert not re.search(r"\bimport\s*\(|@import|\beval\(|new Function", text), path
    for path in (STATIC / "js").glob("*.js"):                       # module imports stay in the folder
        for target in re.findall(r'from "(\./[^"]+)"', path.read_text(encoding="utf-8")):
            assert (path.parent / target).is_file(), (path, target)
    # KaTeX's fonts: the first (woff2) source of each face is shipped
    css = (STATIC / "vendor" / "katex" / "katex.min.css").read_text(encoding="utf-8")
    fonts = set(re.findall(r"url\((fonts/[^)]+\.woff2)\)", css))
    assert fonts and all((STATIC / "vendor" / "katex" / font).is_file() for font in fonts)
    assert "@import" not in css and "url(http" not in css
    for folder in ("marked", "dompurify", "katex", "highlight"):
        assert (STATIC / "vendor" / folder / "LICENSE").is_file(), folder
        assert folder in (STATIC / "vendor" / "README.md").read_text(encoding="utf-8")


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
    policy = response.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'self'" and directives["script-src"] == "'self'"     # no inline script
    assert directives["style-src"] == "'self'" and directives["connect-src"] == "'self'"
    assert directives["object-src"] == "'none'" and "unsafe-eval" not in policy


def test_static_files_only_from_the_package(server):
    """/static/ serves the page's own files with fixed types and the page's CSP; nothing else (no path
    tricks, no other suffixes)."""
    script = httpx.get(server.base_url + "/static/js/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "default-src 'self'" in script.headers["content-security-policy"]
    assert script.headers["x-content-type-options"] == "nosniff"
    font = httpx.get(server.base_url + "/static/vendor/katex/fonts/KaTeX_Main-Regular.woff2")
    assert font.status_code == 200 and font.headers["content-type"] == "font/woff2"
    assert font.content == (STATIC / "vendor/katex/fonts/KaTeX_Main-Regular.woff2").read_bytes()
    assert httpx.get(server.base_url + "/static/style.css").headers["content-type"].startswith("text/css")
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/index.html",
                 "/static/js", "/static/nothing.js", "/static//etc/passwd", "/static/vendor/katex/fonts/x.ttf"):
        response = httpx.get(server.base_url + path)
        assert response.status_code == 404, (path, response.status_code)
        assert "error" in response.json()


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
    first_answer = page.text_content(".msg.assistant .raw")
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


# ---------------------------------------------------------------------------------------------------
# Answers with fixed content: the page against a test double of the engine's output (Playwright fulfils
# /v1/chat/completions with an SSE body; the page, /health and /v1/models come from the real server)
# ---------------------------------------------------------------------------------------------------

DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"


def sse_body(text: str, piece: int = 5) -> str:
    """``text`` as OpenAI chat.completion.chunk events, a few characters each (so the page renders partial
    markdown on the way), then the usage and [DONE]."""
    chunks = [{"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": "tiny-1B",
               "choices": [{"index": 0, "delta": {"content": text[i:i + piece]}, "finish_reason": None}]}
              for i in range(0, len(text), piece)]
    chunks.append({"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": "tiny-1B",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def fake_answers(page, answers: list[str]) -> list[dict]:
    """Answer the page's chat requests with ``answers`` in turn; returns the list the request bodies go to."""
    sent: list[dict] = []

    def fulfil(route):
        sent.append(json.loads(route.request.post_data))
        route.fulfill(status=200, headers={"content-type": "text/event-stream"},
                      body=sse_body(answers[min(len(sent), len(answers)) - 1]))

    page.route("**/v1/chat/completions", fulfil)
    return sent


def open_page(server, browser_context, *, fresh: bool = True):
    page = browser_context.new_page()
    page.set_default_timeout(15_000)
    page.goto(server.base_url + "/")
    page.wait_for_selector("#status.ready", timeout=20_000)
    page.wait_for_selector("body[data-restored]")
    if fresh:
        page.click("#new-chat")
    return page


def ask(page, text: str, count: int, files: list[Path] = ()) -> None:
    """Send ``text`` (with ``files`` attached) and wait for the ``count``-th finished answer."""
    from playwright.sync_api import expect

    for file in files:
        page.set_input_files("#file", str(file))
    if files:
        expect(page.locator("#attachments .thumb")).to_have_count(len(files))
    page.fill("#input", text)
    page.click("#send")
    expect(page.locator(".msg.assistant.done")).to_have_count(count, timeout=30_000)


MARKDOWN = """Here is **a summary**:

1. first item
2. second item with `inline code`

| name | count |
|------|------:|
| cats | 2 |
| dogs | 3 |

```python
def area(r):
    return 3.14159 * r ** 2
```

The area is $A = \\pi r^2$, and in display:

$$\\int_0^1 x^2\\,dx = \\frac{1}{3}$$
"""


def test_markdown_table_code_and_math_render(server, browser_context):
    page = open_page(server, browser_context)
    # "Delete all" (after a confirmation) empties the list kept by the earlier tests
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#delete-all")
    expect_count(page, "#chats li", 0)
    DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1100, "height": 760})
    page.screenshot(path=str(DOCS_IMAGES / "chat-empty.png"))
    fake_answers(page, [MARKDOWN])
    ask(page, "Summarize, with a table, code and a formula.", 1)
    answer = page.locator(".msg.assistant > .text")
    assert answer.locator("strong").inner_text() == "a summary"
    assert answer.locator("ol > li").count() == 2 and answer.locator("li code").inner_text() == "inline code"
    rows = answer.locator("table tr")
    assert rows.count() == 3
    assert [c.strip() for c in rows.nth(2).locator("td").all_inner_texts()] == ["dogs", "3"]
    code = answer.locator(".code pre code.language-python")
    assert "return 3.14159 * r ** 2" in code.inner_text()
    assert code.locator("span.hljs-keyword").first.inner_text() == "def"              # highlighted
    copy = answer.locator(".code button.copy")
    assert copy.get_attribute("aria-label") == "Copy code"
    assert answer.locator(".katex").count() == 2 and answer.locator(".katex-display").count() == 1
    assert answer.locator(".katex-display .mfrac").count() == 1                          # \frac typeset
    assert "π" in answer.locator(".katex").first.locator(".katex-html").inner_text()      # \pi typeset
    # the raw text is one toggle away, and back
    toggle = page.locator(".msg.assistant .raw-toggle")
    toggle.click()
    assert page.locator(".msg.assistant .raw").is_visible() and not answer.is_visible()
    assert page.locator(".msg.assistant .raw").inner_text().startswith("Here is **a summary**")
    toggle.click()
    assert answer.is_visible()
    page.screenshot(path=str(DOCS_IMAGES / "chat-rendered.png"))
    browser_context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.base_url)
    copy.click()
    expect_text(copy, "Copied")
    assert page.evaluate("() => navigator.clipboard.readText()") == "def area(r):\n    return 3.14159 * r ** 2"
    page.close()


XSS = """Try these: <img src=x onerror="console.log('PWNED img'); window.pwned = 1"> inline,

<img src=x onerror="console.log('PWNED block'); window.pwned = 1">

<script>console.log('PWNED script'); window.pwned = 2</script>

<svg onload="console.log('PWNED svg')"><circle r="5"/></svg> <iframe src="http://tracker.invalid/frame"></iframe>

An <a href="javascript:console.log('PWNED link')">click me</a> and a [markdown link](javascript:console.log('PWNED md'))
and a [fine link](http://example.invalid/page).

![pixel](http://tracker.invalid/pixel.png?user=1) ![local](/health?tracked=1)

<style>body { background: url(http://tracker.invalid/bg.png) }</style>

<div style="background-image: url(http://tracker.invalid/css.png)">styled</div>

$\\href{javascript:console.log('PWNED tex')}{tex link}$ and $\\includegraphics{http://tracker.invalid/tex.png}$
"""


def test_model_output_executes_and_loads_nothing(server, browser_context):
    page = open_page(server, browser_context)
    console: list[str] = []
    requests: list[str] = []
    dialogs: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    fake_answers(page, [XSS])
    ask(page, "Say something dangerous.", 1)
    answer = page.locator(".msg.assistant > .text")
    assert "click me" in answer.inner_text() and "fine link" in answer.inner_text()
    for tag in ("img", "script", "iframe", "style", "image", "object", "embed"):
        assert answer.locator(tag).count() == 0, tag
    assert answer.locator("[onerror], [onload], [style*=url]").count() == 0
    hrefs = answer.locator("a[href]").evaluate_all("(links) => links.map((a) => [a.getAttribute('href'), a.rel])")
    assert hrefs == [["http://example.invalid/page", "noopener noreferrer"]], hrefs
    assert "[image: pixel (http://tracker.invalid/pixel.png?user=1)]" in answer.inner_text()
    answer.get_by_text("markdown link").click()
    answer.get_by_text("click me").click()
    page.wait_for_timeout(300)                    # what a click could have run has run by now
    assert page.evaluate("() => window.pwned") is None
    assert not [line for line in console if "PWNED" in line or line.startswith(("error", "pageerror"))], console
    assert not dialogs
    assert all(url.startswith(server.base_url) for url in requests), requests
    assert not [url for url in requests if "tracked" in url or "tracker" in url]
    page.close()


def _scene_png(path: Path) -> None:
    """400x300: two red squares and a blue one (what the grounding answer below points at)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (400, 300), (236, 240, 244))
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 60, 160, 180), fill=(210, 40, 40))
    draw.rectangle((200, 150, 280, 270), fill=(210, 40, 40))
    draw.ellipse((300, 30, 380, 110), fill=(40, 80, 210))
    image.save(path)


GROUNDING = ("There are <ref>two red squares</ref><box>[[100, 200, 400, 600], [500, 500, 700, 900]]</box> "
             "and <ref>a blue circle</ref><box>[[750, 100, 950, 367]]</box> in the image.")


def test_grounding_boxes_drawn_over_the_last_image(server, browser_context, tmp_path):
    first, scene = tmp_path / "first.png", tmp_path / "scene.png"
    first.write_bytes(png_bytes(64, 48, (20, 160, 20)))
    _scene_png(scene)
    page = open_page(server, browser_context)
    page.set_viewport_size({"width": 1100, "height": 1000})
    sent = fake_answers(page, ["A green image.", GROUNDING])
    ask(page, "What is this?", 1, [first])
    ask(page, "Please provide the bounding box coordinates of the red squares and the blue circle.", 2, [scene])
    # the tags are special tokens of the real checkpoints: the page asks for them to be kept in the text
    assert all(body["skip_special_tokens"] is False for body in sent)
    answer = page.locator(".msg.assistant").nth(1)
    # the text: refs as coloured phrases, no tags
    text = answer.locator(":scope > .text")
    assert text.inner_text().strip() == "There are two red squares and a blue circle in the image."
    refs = text.locator("mark.ref")
    assert refs.all_inner_texts() == ["two red squares", "a blue circle"]
    # the boxes: over the second image (the last one before the answer), none on the first answer
    assert page.locator(".msg.assistant").nth(0).locator(".gbox").count() == 0
    figure_img = answer.locator(".grounding .gframe img")
    assert figure_img.get_attribute("src") == page.locator(".msg.user .images img").nth(1).get_attribute("src")
    assert figure_img.evaluate("(img) => img.complete && img.naturalWidth") == 400
    image_box = figure_img.bounding_box()
    boxes = answer.locator(".gbox")
    assert boxes.count() == 3
    expected = [("two red squares", (100, 200, 400, 600)), ("two red squares", (500, 500, 700, 900)),
                ("a blue circle", (750, 100, 950, 367))]
    colours = []
    for i, (label, (x1, y1, x2, y2)) in enumerate(expected):
        box = boxes.nth(i)
        assert box.get_attribute("data-ref") == label and box.locator(".glabel").inner_text() == label
        drawn = box.bounding_box()
        width, height = image_box["width"], image_box["height"]
        want = {"x": image_box["x"] + x1 / 1000 * width, "y": image_box["y"] + y1 / 1000 * height,
                "width": (x2 - x1) / 1000 * width, "height": (y2 - y1) / 1000 * height}
        for key, value in want.items():
            assert abs(drawn[key] - value) <= 1.0, (i, key, drawn, want)
        colours.append(box.evaluate("(el) => getComputedStyle(el).borderTopColor"))
    assert colours[0] == colours[1] != colours[2]                 # one colour per ref
    assert refs.nth(0).evaluate("(el) => getComputedStyle(el).color") == colours[0]
    page.locator("#scroller").evaluate("(el) => { el.scrollTop = el.scrollHeight; }")
    page.screenshot(path=str(DOCS_IMAGES / "chat-grounding.png"))
    # the raw text, tags and all, is one toggle away
    answer.locator(".raw-toggle").click()
    assert answer.locator(".raw").inner_text() == GROUNDING
    page.close()



def test_conversation_survives_reload_and_export_import_round_trips(server, browser_context, tmp_path):
    image = tmp_path / "blue.png"
    image.write_bytes(png_bytes(40, 30, (20, 20, 200)))
    page = open_page(server, browser_context)
    sent = fake_answers(page, ["First **answer**.", "Second answer."])
    ask(page, "Remember this picture.", 1, [image])
    ask(page, "And now?", 2)
    conversation = [*sent[1]["messages"], {"role": "assistant", "content": "Second answer."}]
    assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]
    assert conversation[0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")

    # a reload brings the conversation back (IndexedDB), images and rendering included
    page.wait_for_selector("body[data-pending-saves='0']")      # the last answer's write has landed
    page.reload()
    page.wait_for_selector("body[data-restored]")
    assert page.locator(".msg").count() == 4
    first_image = conversation[0]["content"][1]["image_url"]["url"]
    assert page.locator(".msg.user .images img").get_attribute("src") == first_image
    assert page.locator(".msg.assistant > .text strong").inner_text() == "answer"
    chats = page.locator("#chats li")
    assert chats.count() >= 1 and page.locator("#chats li.active .open").inner_text() == "Remember this picture."

    # continue it: the history goes with the next question
    ask(page, "Third question", 3)
    assert sent[-1]["messages"][:4] == conversation
    conversation = [*sent[-1]["messages"], {"role": "assistant", "content": "Second answer."}]

    # rename from the side list
    page.locator("#chats li.active .rename").click()
    page.fill("#chats li.active input", "Blue picture")
    page.press("#chats li.active input", "Enter")
    page.wait_for_selector("#chats li.active .open:text('Blue picture')")

    # export: the OpenAI messages, exactly what was sent and answered
    with page.expect_download() as download:
        page.click("#export")
    exported = json.loads(Path(download.value.path()).read_text(encoding="utf-8"))
    assert exported["messages"] == conversation and exported["title"] == "Blue picture"

    # import it back as a new conversation: the same messages, on screen and in a second export
    page.click("#new-chat")
    before = page.locator("#chats li").count()
    saved = tmp_path / "conversation.json"
    saved.write_text(json.dumps(exported), encoding="utf-8")
    page.set_input_files("#import-file", str(saved))
    page.wait_for_selector("#store-note:text('Imported 6 messages')")
    assert page.locator("#chats li").count() == before + 1
    assert page.locator(".msg").count() == 6
    with page.expect_download() as download:
        page.click("#export")
    assert json.loads(Path(download.value.path()).read_text(encoding="utf-8"))["messages"] == conversation

    # a file that is not a conversation is refused with a reason
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}), encoding="utf-8")
    page.set_input_files("#import-file", str(bad))
    page.wait_for_selector("#store-note:text('Import failed')")

    # delete: gone from the list, and after a reload too
    count = page.locator("#chats li").count()
    page.locator("#chats li.active .delete").click()
    expect_count(page, "#chats li", count - 1)
    assert page.locator(".msg").count() == 0
    page.reload()
    page.wait_for_selector("body[data-restored]")
    expect_count(page, "#chats li", count - 1)
    assert page.locator(".msg").count() == 0
    page.close()


def expect_text(locator, text: str) -> None:
    from playwright.sync_api import expect

    expect(locator).to_have_text(text)


def expect_count(page, selector: str, count: int) -> None:
    from playwright.sync_api import expect

    expect(page.locator(selector)).to_have_count(count)


def test_edit_a_question_and_regenerate_an_answer(server, browser_context):
    from playwright.sync_api import expect

    page = open_page(server, browser_context)
    sent = fake_answers(page, ["one", "two", "three", "four"])
    ask(page, "First question", 1)
    ask(page, "Second question", 2)
    # regenerate the last answer: the same conversation is sent again, the answer replaced
    assert page.locator(".msg.assistant").nth(0).locator(".regenerate").count() == 0      # only the last one
    page.locator(".msg.assistant").nth(1).locator(".regenerate").click()
    expect(page.locator(".msg.assistant.done > .text")).to_have_text(["one", "three"])
    expect_count(page, ".msg", 4)
    assert sent[2]["messages"] == sent[1]["messages"]
    # edit the first question: everything after it goes, the edited question is answered
    page.locator(".msg.user").nth(0).get_by_role("button", name="Edit this message and answer again").click()
    page.fill(".msg.user .edit textarea", "First question, edited")
    page.keyboard.press("Control+Enter")
    expect(page.locator(".msg.assistant.done > .text")).to_have_text(["four"])
    expect_count(page, ".msg", 2)
    assert [m["content"][0]["text"] for m in sent[3]["messages"]] == ["First question, edited"]
    assert page.locator(".msg.user > .text").inner_text() == "First question, edited"
    page.close()


def test_themes_and_labels(server, browser_context):
    page = open_page(server, browser_context, fresh=False)
    page.emulate_media(color_scheme="light")
    light = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    page.emulate_media(color_scheme="dark")
    dark = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    assert light == "rgb(246, 247, 249)" and dark == "rgb(20, 23, 28)"
    page.emulate_media(color_scheme=None)
    # every control has a name a screen reader can say
    unnamed = page.evaluate("""() => [...document.querySelectorAll('button, input, textarea, select')]
        .filter((el) => !(el.getAttribute('aria-label') || el.closest('label') || el.textContent.trim()))
        .map((el) => el.outerHTML)""")
    assert unnamed == []
    # the keyboard reaches the composer and sends with Enter
    page.focus("#input")
    assert page.evaluate("() => document.activeElement.id") == "input"
    page.close()


def test_video_upload_is_sent_as_video_url_and_answered(server, browser_context):
    """A video file becomes a video_url part (data: URL) with the frames setting as media_io_kwargs; the real
    tiny model answers it, and the message shows a poster frame."""
    video = Path(__file__).resolve().parents[1] / "fixtures" / "data" / "video.mp4"
    page = open_page(server, browser_context)
    sent: list[dict] = []

    def capture(route):
        sent.append(json.loads(route.request.post_data))
        route.continue_()

    page.route("**/v1/chat/completions", capture)
    page.click("#settings-toggle")
    page.fill("#max-tiles", "1")
    page.fill("#max-tokens", "4")
    page.fill("#num-frames", "2")
    page.press("#num-frames", "Tab")
    ask(page, "What happens in this video?", 1, [video])
    assert page.locator(".msg.error").count() == 0
    assert re.search(r"done|max tokens", page.locator(".msg.assistant .meta").inner_text())
    parts = sent[0]["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["text", "video_url"]
    assert parts[1]["video_url"]["url"] == "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()
    assert sent[0]["media_io_kwargs"] == {"video": {"num_frames": 2}}
    poster = page.locator(".msg.user .videos img.poster")
    assert poster.get_attribute("src").startswith("data:image/jpeg;base64,")
    assert poster.evaluate("(img) => img.naturalWidth") == 320
    assert "2 frames" in page.locator(".msg.user .videos figcaption").inner_text()
    page.close()


def test_grounding_parser_and_storage_cap(server, browser_context):
    """The page's own modules, called in the page: the grounding parser on the forms the models write, and the
    store's size cap (a scratch database with a small cap)."""
    page = open_page(server, browser_context, fresh=False)
    parsed = page.evaluate("""async () => {
        const { parseGrounding } = await import('/static/js/grounding.js');
        return [
            parseGrounding('<ref>a</ref><box>[[1, 2, 3, 4], [5, 6, 7, 8]]</box> and ' +
                           '<ref>b</ref> <box>[[0,0,1000,1000]]</box>'),
            parseGrounding('<ref>sign</ref><quad>[[10, 20, 30, 20, 30, 40, 10, 40]]</quad>'),
            parseGrounding('<box>[[-5, 10, 1200, 990.5]]</box> then <ref>nothing drawn</ref> text ' +
                           '<box>[9,9,19,19]</box>'),
            parseGrounding('<ref>half</ref><box>[[1, 2, 3'),
        ];
    }""")
    assert parsed[0] == [{"ref": "a", "boxes": [[1, 2, 3, 4], [5, 6, 7, 8]], "quads": []},
                         {"ref": "b", "boxes": [[0, 0, 1000, 1000]], "quads": []}]
    assert parsed[1] == [{"ref": "sign", "boxes": [], "quads": [[10, 20, 30, 20, 30, 40, 10, 40]]}]
    assert parsed[2] == [{"ref": None, "boxes": [[0, 10, 1000, 990.5]], "quads": []},
                         {"ref": None, "boxes": [[9, 9, 19, 19]], "quads": []}]     # text between: not that ref's
    assert parsed[3] == []                                                            # still streaming
    rendered = page.evaluate("""async () => {
        const { renderMarkdown } = await import('/static/js/markdown.js');
        const html = (text) => { const div = document.createElement('div');
                                 div.append(renderMarkdown(text)); return div.innerHTML; };
        return [html('<ref>the car</ref><box>[[1, 2, 3, 4]]</box>'),
                html('<ref>a</ref>\\n<box>[[1, 2, 3, 4]]</box>\\n\\n- <ref>b</ref><quad>[[1,2,3,4,5,6,7,8]]</quad>')];
    }""")
    assert rendered[0] == '<p><mark class="ref c0">the car</mark></p>\n'
    assert '<mark class="ref c0">a</mark>' in rendered[1] and '<li><mark class="ref c1">b</mark></li>' in rendered[1]
    assert "&lt;" not in "".join(rendered) and "[[" not in "".join(rendered)
    capped = page.evaluate("""async () => {
        const { ConversationStore } = await import('/static/js/store.js');
        const store = await ConversationStore.open({ name: 'internvl-chat-test-cap', maxBytes: 1000 });
        await store.clear();
        const message = (n) => [{ role: 'user', content: 'x'.repeat(n) }];
        const pause = () => new Promise((resolve) => setTimeout(resolve, 5));
        const results = [];
        for (const id of ['old', 'middle', 'new']) {
            results.push(await store.put({ id, title: id, messages: message(350) }));
            await pause();
        }
        results.push(await store.put({ id: 'huge', title: 'huge', messages: message(2000) }));
        const kept = (await store.list()).map((m) => m.id);
        await store.clear();
        return { results, kept };
    }""")
    assert capped["results"] == [{"saved": True, "evicted": []}, {"saved": True, "evicted": []},
                                 {"saved": True, "evicted": ["old"]}, {"saved": False, "evicted": []}]
    assert capped["kept"] == ["new", "middle"]
    page.close()
