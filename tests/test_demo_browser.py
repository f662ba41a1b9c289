"""The demo app in a real headless Chromium: upload, ask, watch the answer stream; generate; tokenize.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make test`` installs them when it runs as root).
Without them the test is skipped with a loud reason, or fails when ``UNITOK_REQUIRE_BROWSER=1`` (as in CI).

Screenshots of each tab are written to ``UNITOK_SCREENSHOT_DIR`` (default: a pytest temporary folder).
``UNITOK_DEMO_MODEL=DIR`` runs the same checks on a trained checkpoint (e.g. the quick start's) instead of
a tiny random model, optionally with ``UNITOK_DEMO_IMAGE`` and ``UNITOK_DEMO_QUESTION`` from its world; that
is how the README's screenshots are taken::

    UNITOK_DEMO_MODEL=runs/quickstart UNITOK_DEMO_IMAGE=runs/quickstart/qa_examples/007600.png \
    UNITOK_DEMO_QUESTION="How many hearts are there?" UNITOK_SCREENSHOT_DIR=docs/images \
    pytest tests/test_demo_browser.py
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mllm_helpers import one_thread, tiny_mllm, tiny_unitok  # noqa: F401
from PIL import Image

from unitok.scripts.demo.backend import DemoBackend
from unitok.scripts.demo.uploads import UploadLimits, open_image

logger = logging.getLogger(__name__)

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-crash-reporter",
    "--window-size=1280,900",
)
WAIT_S = 90
WATCH_ANSWER = """
window.answerTexts = [];
const chat = document.querySelector('#chatbot');
new MutationObserver(() => {
  const bots = chat.querySelectorAll('[data-testid=bot]');
  if (bots.length) window.answerTexts.push(bots[bots.length - 1].innerText);
}).observe(chat, {subtree: true, childList: true, characterData: true});
"""
QUESTION = os.environ.get("UNITOK_DEMO_QUESTION", "what colour is the shape ?")
UPLOAD_LIMIT = UploadLimits(max_bytes=100_000)
MAX_NEW_TOKENS = 128


def _browser_or_skip() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        driver = None
    if chromium and driver:
        return chromium, driver
    reason = (
        "BROWSER TEST NOT RUN: needs Debian's chromium + chromium-driver and the selenium package "
        f"(found chromium={chromium}, chromedriver={driver}); `make test` installs them when run as root"
    )
    if os.environ.get("UNITOK_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The app served on a free local port: (url, backend)."""
    _browser_or_skip()
    from unitok.scripts.demo.app import LOCALHOST, build_app, free_port, launch

    model = os.environ.get("UNITOK_DEMO_MODEL")
    if model:
        backend = DemoBackend.load(model, UPLOAD_LIMIT)
    else:
        mllm = tiny_mllm(tiny_unitok())
        fast_stream = mllm.chat_stream

        def paced_stream(*args, **kwargs):
            # The tiny model answers within a frame or two on a fast machine; pace it like a real model.
            for piece in fast_stream(*args, **kwargs):
                time.sleep(0.01)
                yield piece

        mllm.chat_stream = paced_stream
        backend = DemoBackend(mllm.unitok, mllm, UPLOAD_LIMIT)
    app = build_app(backend, model or "tiny random model")
    url = launch(app, port=free_port(), limits=UPLOAD_LIMIT, block=False)
    assert url.startswith(f"http://{LOCALHOST}:"), f"the demo should bind {LOCALHOST} by default, got {url}"
    yield url.rstrip("/"), backend
    app.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium through chromedriver, with a fresh profile and the network log on."""
    chromium, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where the screenshots go."""
    folder = os.environ.get("UNITOK_SCREENSHOT_DIR")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _wait(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))
    except Exception as err:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from err


def _wait_settled(driver, selector: str, what: str, quiet_s: float = 1.0) -> None:
    """Wait until the text under ``selector`` has not changed for ``quiet_s`` seconds."""
    last = {"text": None, "since": time.monotonic()}

    def settled(d):
        text = _text(d, selector)
        if text != last["text"]:
            last.update(text=text, since=time.monotonic())
        return time.monotonic() - last["since"] >= quiet_s

    _wait(driver, settled, what)


def _css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def _text(driver, selector: str) -> str:
    """innerText of the last element matching ``selector`` ('' if none)."""
    script = (
        "const e = document.querySelectorAll(arguments[0]); return e.length ? e[e.length - 1].innerText : '';"
    )
    return driver.execute_script(script, selector) or ""


def _words(text: str) -> str:
    return " ".join(text.split())


def _open_tab(driver, name: str) -> None:
    tab = next(t for t in _css(driver, "button[role=tab]") if t.text.strip() == name)
    tab.click()


def _set_number(driver, elem_id: str, value: float) -> None:
    box = _css(driver, f"#{elem_id} input[type=number]")[0]
    box.clear()
    box.send_keys(str(value))
    box.send_keys("\t")


def _toast(driver) -> str:
    return _wait(driver, lambda d: _text(d, "[data-testid=toast-body]"), "an error message in the page")


def test_demo_in_a_real_browser(demo, browser, shots, tmp_path):
    url, backend = demo
    driver = browser
    image_path = tmp_path / "red square.png"
    if os.environ.get("UNITOK_DEMO_IMAGE"):
        image_path = tmp_path / Path(os.environ["UNITOK_DEMO_IMAGE"]).name
        shutil.copy(os.environ["UNITOK_DEMO_IMAGE"], image_path)
    else:
        image = Image.new("RGB", (96, 80), (240, 240, 240))
        image.paste((200, 30, 30), (30, 20, 70, 60))
        image.save(image_path)

    driver.get(url)
    _wait(driver, lambda d: len(_css(d, "button[role=tab]")) == 3, "the three tabs")

    # ---- Chat: upload, ask, watch the answer grow, ask again, clear.
    _css(driver, "#chat-upload input[type=file]")[0].send_keys(str(image_path))
    _wait(driver, lambda d: _css(d, "#chat-image img"), "the uploaded image's preview")
    expected = backend.mllm.chat(
        [{"role": "user", "content": QUESTION}], [open_image(image_path)], max_new_tokens=MAX_NEW_TOKENS
    )
    # A trained model may answer in one word; the tiny random one always rambles, so it is watched streaming.
    streamable = len(expected.split()) >= 3
    assert streamable or os.environ.get("UNITOK_DEMO_MODEL"), (
        f"answer too short to watch it stream: {expected!r}"
    )
    # The page records every text the answer bubble shows, however fast the answer streams.
    driver.execute_script(WATCH_ANSWER)
    _css(driver, "#chat-question textarea")[0].send_keys(QUESTION)
    _css(driver, "#chat-send")[0].click()
    _wait(driver, lambda d: _words(_text(d, "#chatbot [data-testid=bot]")) == _words(expected), "the answer")
    seen = [_words(text) for text in driver.execute_script("return window.answerTexts")]
    seen = [text for i, text in enumerate(seen) if text and (i == 0 or text != seen[i - 1])]
    assert seen and seen[-1] == _words(expected), f"final answer {seen[-1:]} != the model's {expected!r}"
    partial = [s for s in seen[:-1] if _words(expected).startswith(s)]
    assert partial or not streamable, f"the answer appeared at once, not streamed: {seen}"
    assert _words(_text(driver, "#chatbot [data-testid=user]")) == QUESTION
    driver.save_screenshot(str(shots / "demo-chat.png"))

    _css(driver, "#chat-question textarea")[0].send_keys("how many shapes are there ?\n")
    _wait(driver, lambda d: len(_css(d, "#chatbot [data-testid=user]")) == 2, "the second question")
    _wait(driver, lambda d: len(_css(d, "#chatbot [data-testid=bot]")) == 2, "the second answer")
    _wait(
        driver,
        lambda d: _css(d, "#chat-send") and _css(d, "#chat-send")[0].is_enabled(),
        "the chat to finish",
    )
    _wait_settled(driver, "#chatbot [data-testid=bot]", "the second answer to finish streaming")
    _css(driver, "#chat-clear")[0].click()
    _wait(driver, lambda d: not _css(d, "#chatbot [data-testid=user]"), "the conversation to clear")

    # ---- Text to image: two images with a seed, a progress indicator per position, a downloadable gallery.
    _open_tab(driver, "Text to image")
    prompt = "a red circle on the left"
    _css(driver, "#t2i-prompt textarea")[0].send_keys(prompt)
    _set_number(driver, "t2i-seed", 7)
    _set_number(driver, "t2i-count", 2)
    _css(driver, "#t2i-generate")[0].click()
    progress = set()
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and len(_css(driver, "#t2i-gallery img")) < 2:
        match = re.search(r"(\d+)/(\d+) positions", _text(driver, "#t2i-gallery"))
        if match:
            progress.add(int(match.group(1)))
        time.sleep(0.02)
    images = _css(driver, "#t2i-gallery img")
    assert len(images) == 2, "the gallery did not show two images"
    assert progress, "no progress indicator was shown while positions were generated"
    assert _css(driver, "#t2i-gallery button[aria-label='Download All']"), (
        "the gallery has no download button"
    )
    direct = backend.generate(prompt, 2, cfg_scale=3.0, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    for element, want in zip(images, direct, strict=True):
        with urllib.request.urlopen(element.get_attribute("src"), timeout=30) as response:
            shown = Image.open(io.BytesIO(response.read())).convert("RGB")
        assert list(shown.getdata()) == list(want.getdata()), (
            "the gallery shows other images than the seed gives"
        )
    driver.save_screenshot(str(shots / "demo-text-to-image.png"))

    # ---- Tokenizer: original beside reconstruction, grid, bits, PSNR; then bad uploads get a message.
    _open_tab(driver, "Tokenizer")
    _css(driver, "#tok-upload input[type=file]")[0].send_keys(str(image_path))
    stats = _wait(
        driver, lambda d: "PSNR" in _text(d, "#tok-stats") and _text(d, "#tok-stats"), "the statistics"
    )
    result = backend.reconstruct(open_image(image_path))
    h, w, k = result.grid
    assert (
        f"{h} x {w} x {k}" in stats
        and f"{result.bits:,.0f} bits" in stats
        and f"{result.psnr:.2f} dB" in stats
    )
    assert _css(driver, "#tok-original img") and _css(driver, "#tok-reconstruction img")
    driver.save_screenshot(str(shots / "demo-tokenizer.png"))

    fake = tmp_path / "holiday.png"
    fake.write_text("these are words, not pixels")
    _css(driver, "#tok-upload button[aria-label='Clear']")[0].click()
    upload = _wait(driver, lambda d: _css(d, "#tok-upload input[type=file]"), "the upload area back")
    upload[0].send_keys(str(fake))
    message = _toast(driver)
    assert "holiday.png is not an image" in message
    assert "Traceback" not in driver.find_element("tag name", "body").text

    big = tmp_path / "noise.png"
    Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3)).save(big)
    assert big.stat().st_size > UPLOAD_LIMIT.max_bytes
    for close in _css(driver, "[data-testid=toast-close]"):
        close.click()
    _wait(driver, lambda d: not _text(d, "[data-testid=toast-body]"), "the error message to close")
    _css(driver, "#tok-upload button[aria-label='Clear']")[0].click()
    upload = _wait(driver, lambda d: _css(d, "#tok-upload input[type=file]"), "the upload area back")
    upload[0].send_keys(str(big))
    message = _toast(driver)
    assert "exceed the maximum allowed size" in message and "noise.png" in message

    # ---- Nothing but the app itself was fetched.
    foreign = set()
    for entry in driver.get_log("performance"):
        event = json.loads(entry["message"])["message"]
        if event["method"] == "Network.requestWillBeSent":
            request_url = urlparse(event["params"]["request"]["url"])
            if (
                request_url.scheme in ("http", "https", "ws", "wss")
                and request_url.netloc != urlparse(url).netloc
            ):
                foreign.add(request_url.geturl())
    assert not foreign, f"the page reached beyond the app: {sorted(foreign)[:5]}"
    logger.info("screenshots in %s", shots)
