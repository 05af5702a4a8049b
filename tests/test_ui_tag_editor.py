"""The tag editor tab, driven through its wired gradio handlers (load, filter, preview, apply, undo, select)."""
from __future__ import annotations

import pytest

gr = pytest.importorskip("gradio")
pytestmark = pytest.mark.needs_gradio

from extensions_lib.jobs.context import UIContext  # noqa: E402
from extensions_lib.ui.tab_tag_editor import build_tag_editor  # noqa: E402
from tests.test_tag_editor import CAPTIONS, caption, make_dataset  # noqa: E402
from tests.test_ui_app import click_handler, components_by_id  # noqa: E402


@pytest.fixture
def tab(tmp_path):
    with gr.Blocks() as demo:
        build_tag_editor(UIContext(cache_dir=tmp_path / "cache"))
    return demo


def values_for(demo, button_id, **overrides):
    fn, inputs = click_handler(demo, button_id)
    values = []
    for comp in inputs:
        key = (comp.elem_id or "").removeprefix("alchemy_tags_")
        values.append(overrides.get(key, comp.value))
    return fn, values


def run(demo, button_id, editor=None, **overrides):
    fn, values = values_for(demo, button_id, **overrides)
    values[0] = editor  # the editor State
    return fn(*values)


def test_load_filter_preview_apply_undo(tab, tmp_path):
    root = make_dataset(tmp_path / "ds")
    out = run(tab, "alchemy_tags_load", folder=str(root))
    editor, gallery, shown, table, status = out[:5]
    assert shown == ["a.png", "b.png", "c.png", "d.png"]
    assert [c for _, c in gallery] == [CAPTIONS["a.png"], CAPTIONS["b.png"], CAPTIONS["c.png"], "(no caption)"]
    assert table["data"][0][:2] == ["1girl", 2] and "4 of 4 images match" in status

    gallery, shown, table, status = run(tab, "alchemy_tags_filter", editor, select_include="smile")
    assert shown == ["a.png", "c.png"]
    assert {r[0] for r in table["data"]} == {"1girl", "long hair", "smile", "1boy", "hat"}

    edit = dict(select_include="smile", action="replace", find="smile", replacement="grin")
    rows, status = run(tab, "alchemy_tags_preview", editor, **edit)
    assert rows["data"] == [["a.png", CAPTIONS["a.png"], "1girl, long hair, grin"],
                            ["c.png", CAPTIONS["c.png"], "1boy, grin, hat"]]
    assert caption(root, "a.png") == CAPTIONS["a.png"]
    out = run(tab, "alchemy_tags_apply", editor, **edit)
    assert caption(root, "c.png") == "1boy, grin, hat" and "2 caption(s) written" in out[3]
    out = run(tab, "alchemy_tags_undo", editor)
    assert caption(root, "c.png") == CAPTIONS["c.png"]
    run(tab, "alchemy_tags_redo", editor)
    assert caption(root, "c.png") == "1boy, grin, hat"


def test_select_then_edit_one_caption_and_errors_show_in_status(tab, tmp_path):
    root = make_dataset(tmp_path / "ds")
    editor = run(tab, "alchemy_tags_load", folder=str(root))[0]
    dep = next(d for d, f in zip(tab.dependencies, tab.fns) if d["trigger"] == "select")
    select_fn = tab.fns[tab.dependencies.index(dep)].fn
    key, text = select_fn(["a.png", "b.png"], editor, gr.SelectData(None, {"index": 1, "value": None}))
    assert (key, text) == ("b.png", CAPTIONS["b.png"])
    out = run(tab, "alchemy_tags_save_caption", editor, selected=key, caption="1girl, bob cut")
    assert caption(root, "b.png") == "1girl, bob cut" and out[-1] == "1girl, bob cut"
    out = run(tab, "alchemy_tags_save_caption", editor, selected=key, caption="   ")
    assert "empty" in out[3] and caption(root, "b.png") == "1girl, bob cut"
    out = run(tab, "alchemy_tags_apply", editor, action="replace", find="(", edit_regex=True)
    assert "bad regular expression" in out[3]
    out = run(tab, "alchemy_tags_apply", None, action="add", tags="x")
    assert "no dataset loaded" in out[3]
    out = run(tab, "alchemy_tags_load", folder=str(tmp_path / "missing"))
    assert "not found" in out[4]


def test_gallery_pages(tab, tmp_path, monkeypatch):
    import extensions_lib.ui.tab_tag_editor as module

    monkeypatch.setattr(module, "GALLERY_LIMIT", 3)
    root = make_dataset(tmp_path / "ds")
    editor = run(tab, "alchemy_tags_load", folder=str(root))[0]
    gallery, shown, table, status = run(tab, "alchemy_tags_filter", editor, page=2)
    assert shown == ["d.png"] and "page 2 of 2" in status and table["data"][0][:2] == ["1girl", 2]
    assert run(tab, "alchemy_tags_filter", editor, page=9)[1] == ["d.png"]  # past the end: the last page


def test_tab_is_in_the_dataset_tabs(tmp_path):
    from extensions_lib.ui import build_dataset_tabs
    from extensions_lib.jobs.thread_runner import ThreadJobRunner

    with gr.Blocks() as demo:
        with gr.Tabs():
            build_dataset_tabs(ThreadJobRunner(), UIContext(cache_dir=tmp_path))
    assert "alchemy_tags_apply" in components_by_id(demo)
