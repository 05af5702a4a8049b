"""Our Train sub-tabs laid out inside the WebUI's Train tab, in a real browser (chromium via Playwright).

The page restates the host's layout (v1.10.1 ``modules/ui.py``): a row holding ``gr.Tabs(elem_id="train_tabs")``
(a host sub-tab, then the extensions' sub-tabs from ``ui_train_tabs_callback``) and the right-hand column
``#ti_gallery_container`` (``ti_output``, the gallery, ``ti_progress``, ``ti_error``). Checked: while one of
our sub-tabs is open, its progress pane (bar, loss curve, preview) and result are in that right-hand column
and the host's empty output is hidden; a host sub-tab gets its column back; a file created after the page
was built is in the Train tab's list as soon as the list is opened.
"""
from __future__ import annotations

import pytest

from test_browser import CHROMIUM, CHROMIUM_ARGS, _requirements, free_port, open_tab  # noqa: F401

pytestmark = [pytest.mark.needs_gradio, pytest.mark.slow]


@pytest.fixture(scope="module")
def webui_page(tmp_path_factory):
    _requirements()
    import gradio as gr
    from playwright.sync_api import sync_playwright

    from extensions_lib.jobs.context import UIContext
    from extensions_lib.jobs.thread_runner import ThreadJobRunner
    from extensions_lib.ui import build_train_tabs
    from extensions_lib.ui.app import SCRIPT_PATH, STYLE_PATH, read_asset

    root = tmp_path_factory.mktemp("webui-layout")
    context = UIContext(embeddings_dir=root / "emb", hypernetworks_dir=root / "hn", log_root=root)
    with gr.Blocks(analytics_enabled=False, css=read_asset(STYLE_PATH)) as demo:
        with gr.Tab("Train", id="train", elem_id="tab_train"):
            with gr.Row(equal_height=False):
                with gr.Tabs(elem_id="train_tabs"):
                    with gr.Tab("Create embedding", id="create_embedding"):
                        gr.Textbox(label="Name", elem_id="train_new_embedding_name")
                    build_train_tabs(ThreadJobRunner(), context)  # what our ui_train_tabs callback does
                with gr.Column(elem_id="ti_gallery_container"):
                    gr.Text(elem_id="ti_output", value="", show_label=False)
                    gr.Gallery(label="Output", show_label=False, elem_id="ti_gallery", columns=4)
                    gr.HTML(elem_id="ti_progress", value="")
                    gr.HTML(elem_id="ti_error", value="")
        demo.load(None, None, None, _js="() => {\n" + read_asset(SCRIPT_PATH) + "\n}")
    demo.queue(concurrency_count=2)
    _app, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                               quiet=True, share=False, inbrowser=False)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(url)
            page.wait_for_selector("#train_tabs")
            try:
                yield page, context
            finally:
                browser.close()
    finally:
        demo.close()


def _in_right_column(page, elem_id: str) -> bool:
    return page.locator(f"#ti_gallery_container #{elem_id}").count() >= 1


def test_our_sub_tabs_use_the_hosts_right_hand_column(webui_page):
    page, _context = webui_page
    open_tab(page, "Train embedding")
    result = page.locator("#alchemy_train_embedding_result").first  # (the progress pane stays hidden until a job)
    result.wait_for(state="visible")
    assert _in_right_column(page, "alchemy_train_embedding_progress")
    assert _in_right_column(page, "alchemy_train_embedding_result")
    assert page.locator("#ti_gallery").first.is_hidden()  # the host's (empty) output steps aside
    form = page.locator("#alchemy_train_embedding_start").first.bounding_box()
    pane = result.bounding_box()
    assert pane["x"] > form["x"] + form["width"] / 2  # on the right of the form, not below it

    open_tab(page, "Train hypernetwork")
    page.locator("#alchemy_train_hypernetwork_result").first.wait_for(state="visible")
    assert result.is_hidden()  # one pane at a time: the open sub-tab's

    open_tab(page, "Create embedding")  # the host's own sub-tab gets its column back
    page.locator("#ti_gallery").first.wait_for(state="visible")
    assert page.locator("#alchemy_train_hypernetwork_result").first.is_hidden()


def test_new_files_are_listed_when_the_list_is_opened(webui_page):
    from extensions_lib.hypernetworks.create import create_hypernetwork
    from extensions_lib.hypernetworks.options import CreateHypernetworkOptions

    page, context = webui_page
    open_tab(page, "Create embedding")
    create_hypernetwork(CreateHypernetworkOptions(name="made_later", sizes=[768]), context.hypernetworks_dir)
    open_tab(page, "Train hypernetwork")
    page.locator("#alchemy_train_hypernetwork_files tr[data-name='made_later']").first.wait_for(state="attached")
    box = page.locator("#alchemy_train_hypernetwork_hypernetwork_name input").first
    box.click()
    page.locator("ul.options li", has_text="made_later").first.wait_for(state="visible", timeout=15_000)
