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
from extensions_lib.jobs.progress import MAX_CURVE_POINTS  # noqa: E402

EMBEDDING = "alchemycat"
# Long enough (seconds, even on a fast idle machine) for the once-a-second progress poll to see it advance.
STEPS = 600


def _requirements():
    pytest.importorskip("gradio", reason="gradio is not installed")
    pytest.importorskip("playwright.sync_api", reason="the Playwright pip package is not installed "
                                                       "(pip install playwright; no browser download needed)")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        reason = f"chromium not found at {CHROMIUM} (apt-get install chromium, or set ALCHEMY_CHROMIUM)"
        if os.environ.get("CI") == "true":  # CI installs it (run.sh test): a missing browser is a failure there
            pytest.fail(reason)
        pytest.skip(reason)


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
    from extensions_lib.jobs.thread_runner import ThreadJobRunner
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


def expected_captions(app) -> list[str]:
    """The captions the tagger's own API gives these images with default options (computed apart)."""
    from extensions_lib.tagger import CaptionOptions, caption_images, decode_image, load_tagger

    tagger = load_tagger(app["context"].tagger_models_dir / "tiny-wd14")
    try:
        images = [decode_image(p) for p in sorted(app["dataset"].glob("*.png"))]
        return caption_images(tagger, images, CaptionOptions())
    finally:
        tagger.unload()


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


def open_accordion(page, elem_id: str) -> None:
    accordion = page.locator(f"#{elem_id}")
    if not accordion.locator(".label-wrap.open").count():
        accordion.locator(".label-wrap").first.click()


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


def snapshot(page, name: str) -> None:
    """With ALCHEMY_E2E_SCREENSHOTS=1, keep a screenshot of each stage (for looking at the UI)."""
    if os.environ.get("ALCHEMY_E2E_SCREENSHOTS"):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"stage-{name}.png"), full_page=True)


def wait_for_panel(page, panel: str, state: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    seen = {}
    while time.monotonic() < deadline:
        seen = progress_state(page, panel)
        if seen["state"] == state:
            return seen
        time.sleep(0.1)
    raise AssertionError(f"progress panel {panel} never reached {state!r}; last: {seen}")


# ---- the flow -------------------------------------------------------------------------------------------

def test_tag_train_and_generate_in_the_browser(app, page):
    from playwright.sync_api import expect

    page.goto(app["url"])
    page.wait_for_selector("#alchemy_tabs")

    # 1. tag the folder
    open_tab(page, "Dataset", "Tagger")
    fill(page, "alchemy_tagger_folder", app["dataset"])
    page.click("#alchemy_tagger_start")
    summary = wait_for_text(page, "alchemy_tagger_result", r"captions written")
    assert "4 captions written for 4 images" in summary, summary
    captions = sorted(app["dataset"].glob("*.txt"))
    assert [c.read_text(encoding="utf-8") for c in captions] == expected_captions(app), \
        "the tab's captions should be the tagger's with its default options"
    tagged = wait_for_panel(page, "tagger", "done")
    assert (tagged["step"], tagged["total"]) == (4, 4) and "image 4/4" in tagged["stats"]
    snapshot(page, "1-tagged")

    # 2. create the embedding
    open_tab(page, "Train", "Create embedding")
    fill(page, "alchemy_create_embedding_name", EMBEDDING)
    fill(page, "alchemy_create_embedding_init_text", "cat")
    page.click("#alchemy_create_embedding_start")
    created = wait_for_text(page, "alchemy_create_embedding_result", r"Created|rror")
    assert created.startswith("Created:") and created.endswith(f"{EMBEDDING}.pt"), created
    embedding_file = app["context"].embeddings_dir / f"{EMBEDDING}.pt"
    assert embedding_file.is_file()
    snapshot(page, "2-created")

    # 3. train it for a few steps, watching progress, the loss curve and the preview
    open_tab(page, "Train embedding")
    page.click("#alchemy_train_embedding_refresh")
    chooser = page.locator("#alchemy_train_embedding_embedding_name input").first
    chooser.fill(EMBEDDING)
    chooser.press("Enter")
    fill(page, "alchemy_train_embedding_data_root", app["dataset"])
    fill(page, "alchemy_train_embedding_steps", STEPS)
    open_accordion(page, "alchemy_train_embedding_group_saving_and_logging")
    fill(page, "alchemy_train_embedding_save_every", STEPS // 2)
    fill(page, "alchemy_train_embedding_create_image_every", STEPS // 2)
    page.click("#alchemy_train_embedding_start")
    seen = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = progress_state(page, "train_embedding")
        if state["state"] in ("running", "stopping") and state["total"] == STEPS and state["step"] > 0:
            if not seen or state["step"] > seen[-1]:
                seen.append(state["step"])
        if state["state"] in ("done", "failed", "cancelled") and seen:
            break
        time.sleep(0.1)
    outcome = wait_for_text(page, "alchemy_train_embedding_result", r"Trained|Failed|Stopped", timeout_s=60)
    assert outcome.startswith(f"Finished: Training embedding {EMBEDDING} ({STEPS}/{STEPS} steps"), outcome
    assert len(seen) >= 2 and seen == sorted(seen), f"progress did not advance while training: {seen}"
    final = wait_for_panel(page, "train_embedding", "done")
    assert final["step"] == STEPS
    assert final["points"] == min(STEPS, MAX_CURVE_POINTS), "the loss curve should hold one point per step " \
                                                             "(downsampled past MAX_CURVE_POINTS)"
    assert final["preview"], "the latest preview image should be shown"
    assert re.search(r"loss \d\.\d{4}", final["stats"]) and "it/s" in final["stats"]
    listed = page.locator(f'#alchemy_train_embedding_list tr[data-name="{EMBEDDING}"]')
    assert listed.count() == 1 and f"step {STEPS}" in listed.inner_text()
    snapshot(page, "3-trained")
    from extensions_lib.formats.embedding import read_embedding
    assert read_embedding(embedding_file).step == STEPS

    # 4. generate with the embedding's name in the prompt
    open_tab(page, "txt2img")
    page.click("#alchemy_txt2img_refresh")
    expect(page.locator("#alchemy_txt2img_embeddings_list")).to_contain_text(EMBEDDING)
    fill(page, "alchemy_txt2img_prompt", f"a photo of {EMBEDDING}")
    fill(page, "alchemy_txt2img_seed", 7)
    page.click("#alchemy_txt2img_start")
    info = wait_for_text(page, "alchemy_txt2img_info", r"Steps:|Failed", timeout_s=120)
    assert info.startswith(f"a photo of {EMBEDDING}\n"), info
    assert re.search(rf'TI hashes: "?{EMBEDDING}: [0-9a-f]{{12}}', info), info
    page.wait_for_selector("#alchemy_txt2img_gallery img")
    snapshot(page, "4-generated")

    # 5. a long run stops cleanly from the Interrupt button, keeping the trained file
    trained_bytes = embedding_file.read_bytes()
    open_tab(page, "Train")
    open_tab(page, "Train embedding")
    fill(page, "alchemy_train_embedding_steps", 100000)
    page.click("#alchemy_train_embedding_start")
    running = wait_for_panel(page, "train_embedding", "running", timeout_s=60)
    assert running["total"] == 100000
    page.click("#alchemy_train_embedding_interrupt")
    stopped = wait_for_text(page, "alchemy_train_embedding_result", r"^Stopped|^Failed", timeout_s=120)
    assert stopped.startswith(f"Stopped: Training embedding {EMBEDDING}") and "Resume from" in stopped, stopped
    assert wait_for_panel(page, "train_embedding", "cancelled")["step"] < 100000
    assert embedding_file.read_bytes() == trained_bytes, "an interrupted run must not replace the finished file"
