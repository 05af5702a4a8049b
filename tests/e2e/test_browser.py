"""End to end in a real browser: Debian's chromium, driven by Playwright, against ``alchemy ui`` on 127.0.0.1.

One flow, as a user would go through it: tag a small folder with a tiny ONNX tagger, create an embedding,
train it for a few steps on the tiny demo model while progress, the loss curve and previews update, see
the finished file listed, then generate with the embedding's name in the prompt. On failure a screenshot
and the page's HTML are saved (the path is printed).

Needs the pip package ``playwright`` (never ``playwright install``: the browser is the system's chromium,
``apt-get install chromium``); skipped with the reason when either is missing.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.needs_gradio, pytest.mark.slow]

CHROMIUM = os.environ.get("ALCHEMY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("ALCHEMY_E2E_ARTIFACTS", Path(__file__).resolve().parents[2] / "outputs" / "e2e"))
EMBEDDING = "alchemycat"
STEPS = 40


def _requirements():
    pytest.importorskip("gradio", reason="gradio is not installed")
    pytest.importorskip("playwright.sync_api", reason="the Playwright pip package is not installed "
                                                       "(pip install playwright; no browser download needed)")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install chromium, or set ALCHEMY_CHROMIUM)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_dataset(folder: Path, n: int = 4) -> Path:
    """Images sharing one strong trait (a red field with a dark square), for the tagger and the trainer."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = np.clip(np.array([210, 40, 40]) + rng.normal(0, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
        pixels[16 + 4 * i:40 + 4 * i, 16:40] = 20
        Image.fromarray(pixels).save(folder / f"cat{i}.png")
    return folder


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    _requirements()
    from extensions_lib.ui.app import ModelHolder, launch, standalone_context
    from extensions_lib.ui.thread_runner import ThreadJobRunner
    from tagger_models import make_wd14_folder

    root = tmp_path_factory.mktemp("e2e")
    tagger_dir = root / "tagger-models"
    make_wd14_folder(tagger_dir / "tiny-wd14")
    dataset = make_dataset(root / "dataset")
    context = standalone_context(ModelHolder(None, root / "cache"), root / "data", tagger_dir)
    runner = ThreadJobRunner()
    demo, url = launch(runner, context, host="127.0.0.1", port=free_port(), block=False)
    try:
        yield {"url": url, "dataset": dataset, "context": context, "runner": runner}
    finally:
        runner.interrupt()
        demo.close()


@pytest.fixture
def page(app, tmp_path, request):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(30_000)
        try:
            yield page
        finally:
            failed = getattr(request.node, "rep_call", None)
            if failed is not None and failed.failed:
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                shot = ARTIFACTS / f"{request.node.name}.png"
                page.screenshot(path=str(shot), full_page=True)
                (ARTIFACTS / f"{request.node.name}.html").write_text(page.content(), encoding="utf-8")
                print(f"\nbrowser screenshot: {shot}")
            context.close()
            browser.close()


# ---- driving gradio 3.41 widgets ------------------------------------------------------------------------

def open_tab(page, *labels: str) -> None:
    for label in labels:
        page.locator("div.tab-nav button", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")).first.click()


def fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id}").locator("textarea, input:not([type=range]):not([type=checkbox])").first
    box.fill(str(value))
    box.press("Tab")  # gradio takes the value on change/blur


def text_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").locator("textarea, input").first.input_value()


def wait_for_text(page, elem_id: str, pattern: str, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    value = ""
    while time.monotonic() < deadline:
        value = text_of(page, elem_id)
        if re.search(pattern, value):
            return value
        time.sleep(0.2)
    raise AssertionError(f"#{elem_id} never matched {pattern!r}; last value: {value!r}")


def progress_state(page, panel: str) -> dict:
    return page.locator(f"#alchemy_{panel}_progress .alchemy-progress").evaluate(
        "el => ({state: el.dataset.state, step: Number(el.dataset.step || 0), total: Number(el.dataset.total || 0),"
        " stats: (el.querySelector('.alchemy-progress-stats') || {}).textContent || '',"
        " points: Number((el.querySelector('.alchemy-loss-svg') || {dataset: {}}).dataset.points || 0),"
        " preview: !!(el.querySelector('img.alchemy-progress-preview:not([hidden])') || {}).src})")


# ---- the flow -------------------------------------------------------------------------------------------

def test_tag_train_and_generate_in_the_browser(app, page):
    page.goto(app["url"])
    page.wait_for_selector("#alchemy_tabs")

    # 1. tag the folder
    open_tab(page, "Dataset", "Tagger")
    fill(page, "alchemy_tagger_folder", app["dataset"])
    page.click("#alchemy_tagger_start")
    summary = wait_for_text(page, "alchemy_tagger_result", r"captions written")
    assert "4 captions written for 4 images" in summary, summary
    captions = sorted(app["dataset"].glob("*.txt"))
    assert len(captions) == 4 and all(c.read_text(encoding="utf-8").strip() for c in captions)
    assert progress_state(page, "tagger")["state"] == "done"
