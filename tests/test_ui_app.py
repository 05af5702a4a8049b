"""The gradio side: options rendered from their one declaration, the tabs' wiring, the progress routes and
``alchemy ui``'s command line."""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

gr = pytest.importorskip("gradio")
pytestmark = pytest.mark.needs_gradio

from extensions_lib.embeddings.options import CreateEmbeddingOptions, EmbeddingTrainOptions  # noqa: E402
from extensions_lib.hypernetworks.options import CreateHypernetworkOptions  # noqa: E402
from extensions_lib.hypernetworks.train_options import HypernetworkTrainOptions  # noqa: E402
from extensions_lib.options import specs  # noqa: E402
from extensions_lib.preprocess.options import PreprocessOptions  # noqa: E402
from extensions_lib.sampling.txt2img import GenerationOptions  # noqa: E402
from extensions_lib.tagger.options import CaptionOptions, TagRunOptions  # noqa: E402
from extensions_lib.ui import build_dataset_tabs, build_train_tabs  # noqa: E402
from extensions_lib.ui.app import build_app  # noqa: E402
from extensions_lib.jobs.context import UIContext  # noqa: E402
from extensions_lib.ui.forms import render_options  # noqa: E402
from extensions_lib.jobs.thread_runner import ThreadJobRunner  # noqa: E402

TAB_OPTIONS = [CaptionOptions, TagRunOptions, PreprocessOptions, CreateEmbeddingOptions, EmbeddingTrainOptions,
               CreateHypernetworkOptions, HypernetworkTrainOptions, GenerationOptions]


def components_by_id(demo) -> dict[str, object]:
    return {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}


def click_handler(demo, button_id: str):
    """(fn, input components) of the click event wired to the button with `button_id`."""
    button = components_by_id(demo)[button_id]
    for dep, fn in zip(demo.dependencies, demo.fns):
        if button._id in dep["targets"] and dep["trigger"] == "click":
            return fn.fn, [demo.blocks[i] for i in dep["inputs"]]
    raise AssertionError(f"no click handler on {button_id}")


def context_for(tmp_path, **kw) -> UIContext:
    return UIContext(embeddings_dir=tmp_path / "emb", hypernetworks_dir=tmp_path / "hn", log_root=tmp_path,
                     tagger_models_dir=tmp_path / "taggers", **kw)


@pytest.mark.parametrize("cls", TAB_OPTIONS, ids=lambda c: c.__name__)
def test_every_ui_option_is_rendered_once_and_reads_back(cls):
    with gr.Blocks():
        form = render_options(cls, elem_prefix="t")
    ui_names = [s.name for s in specs(cls) if s.ui]
    assert sorted(form.names) == sorted(ui_names)
    assert all(c.elem_id == f"t_{name}" for name, c in form.components.items())
    # the components' initial values give the declared defaults back
    assert form.read([c.value for c in form.inputs]) == cls()
    # an empty value may only mean "default" where the browser can send empty: never a Number/Slider
    for spec in specs(cls):
        if spec.ui and spec.default is None:
            assert isinstance(form.components[spec.name], gr.Textbox), spec.name


def test_values_from_the_ui_are_coerced_and_checked():
    with gr.Blocks():
        form = render_options(CaptionOptions, elem_prefix="t")
    values = {name: c.value for name, c in form.components.items()}
    values.update(general_threshold="0.42", character_threshold="", exclude="a, b", rating="last", max_tags=5.0)
    opts = form.read([values[n] for n in form.names])
    assert (opts.general_threshold, opts.character_threshold, opts.exclude, opts.rating, opts.max_tags) == \
        (0.42, None, ["a", "b"], "last", 5)
    values["general_threshold"] = "1.5"
    with pytest.raises(Exception, match="general_threshold .* must be <= 1.0"):
        form.read([values[n] for n in form.names])


def test_grouped_options_go_into_accordions_and_skipped_ones_are_left_out():
    with gr.Blocks() as demo:
        form = render_options(EmbeddingTrainOptions, elem_prefix="ti", skip=("embedding_name",), open_groups=("Run",))
    ids = components_by_id(demo)
    assert "embedding_name" not in form.names and "ti_embedding_name" not in ids
    accordions = {i: b for i, b in ids.items() if isinstance(b, gr.Accordion)}
    assert set(accordions) == {"ti_group_dataset", "ti_group_run", "ti_group_optimisation",
                               "ti_group_saving_and_logging", "ti_group_embedding", "ti_group_previews"}
    assert [i for i, b in accordions.items() if b.open] == ["ti_group_run"]


def test_app_has_every_tab_and_unsupported_ones_say_why(tmp_path):
    context = context_for(tmp_path, unsupported={"tagger": "onnxruntime is missing (pip install onnxruntime)"})
    demo = build_app(ThreadJobRunner(), context)
    ids = components_by_id(demo)
    for key in ("create_embedding", "train_embedding", "train_hypernetwork", "preprocess", "txt2img"):
        assert f"alchemy_{key}_start" in ids and f"alchemy_{key}_progress" in ids, key
    assert "alchemy_create_hypernetwork_start" in ids
    assert "alchemy_tagger_start" not in ids
    notes = [b.value for b in demo.blocks.values()
             if isinstance(b, gr.HTML) and "onnxruntime is missing" in str(b.value)]
    assert len(notes) == 1 and "Not available here" in notes[0]


def test_train_tabs_take_the_webui_txt2img_preview_parameters(tmp_path):
    with gr.Blocks() as demo:
        preview = [gr.Textbox(), gr.Textbox(), gr.Slider(1, 150, 20), gr.Dropdown(["Euler"], value="Euler"),
                   gr.Slider(1, 30, 7), gr.Number(-1), gr.Slider(64, 2048, 512), gr.Slider(64, 2048, 512)]
        with gr.Tabs():
            build_train_tabs(ThreadJobRunner(), context_for(tmp_path, preview_params=preview), title_prefix="Alchemy: ")
    ids = components_by_id(demo)
    assert "alchemy_train_hypernetwork_preview_prompt" not in ids  # read from txt2img instead
    assert "alchemy_train_embedding_preview_from_txt2img" in ids   # the switch itself stays
    tabs = [b.label for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    assert tabs == ["Alchemy: Create embedding", "Alchemy: Create hypernetwork", "Alchemy: Train embedding",
                    "Alchemy: Train hypernetwork"]
    _, inputs = click_handler(demo, "alchemy_train_hypernetwork_start")
    assert inputs[-8:] == preview


def test_starting_while_a_job_runs_is_refused_in_the_tab(tmp_path):
    runner = ThreadJobRunner()
    gate = threading.Event()
    runner.start(lambda o, job: gate.wait(10), None, title="Training embedding busy")
    try:
        with gr.Blocks() as demo:
            with gr.Tabs():
                build_dataset_tabs(runner, context_for(tmp_path))
        fn, inputs = click_handler(demo, "alchemy_preprocess_start")
        values = [str(tmp_path), str(tmp_path / "out"), *[c.value for c in inputs[2:]]]
        text = fn(*values)
        assert text.startswith("Failed: Preprocessing") and "another job is running: Training embedding busy" in text
        assert not (tmp_path / "out").exists()
    finally:
        gate.set()


def test_create_hypernetwork_tab_writes_the_file_and_reports_errors(tmp_path):
    changed = []
    with gr.Blocks() as demo:
        with gr.Tabs():
            build_train_tabs(ThreadJobRunner(), context_for(tmp_path, files_changed=changed.append))
    fn, inputs = click_handler(demo, "alchemy_create_hypernetwork_start")
    names = [c.elem_id.removeprefix("alchemy_create_hypernetwork_") for c in inputs]
    values = {n: c.value for n, c in zip(names, inputs)} | {"name": "mine"}
    assert fn(*[values[n] for n in names]) == f"Created: {tmp_path / 'hn' / 'mine.pt'}"
    assert (tmp_path / "hn" / "mine.pt").is_file() and changed == ["hypernetworks"]
    again = fn(*[values[n] for n in names])
    assert "already exists" in again and "Overwrite Old Hypernetwork" in again


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_progress_routes_serve_the_current_job_and_its_preview(tmp_path):
    from PIL import Image

    from extensions_lib.ui.app import launch

    runner = ThreadJobRunner()
    demo, url = launch(runner, context_for(tmp_path), port=free_port(), block=False)
    try:
        def get(path):
            with urllib.request.urlopen(url + path, timeout=10) as r:
                return r.status, r.headers.get("content-type"), r.read()

        status, kind, body = get("alchemy/progress")
        assert status == 200 and json.loads(body)["state"] == "idle"
        with pytest.raises(urllib.error.HTTPError) as missing:
            get("alchemy/progress/preview")
        assert missing.value.code == 404
        image = tmp_path / "p.png"
        Image.new("RGB", (8, 8), (255, 0, 0)).save(image)
        gate = threading.Event()

        def job(options, ctx):
            ctx.update(step=3, total=10, loss=0.5)
            ctx.set_preview(image)
            gate.wait(10)

        runner.start(job, None, title="routes", panel="train_embedding")
        deadline = time.monotonic() + 10
        while json.loads(get("alchemy/progress")[2])["preview_version"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        payload = json.loads(get("alchemy/progress")[2])
        assert (payload["state"], payload["step"], payload["total"], payload["loss"]) == ("running", 3, 10, 0.5)
        assert get("alchemy/progress/preview")[2] == image.read_bytes()
        gate.set()
    finally:
        demo.close()


def test_ui_command_serves_on_loopback_unless_asked(monkeypatch, tmp_path):
    from extensions_lib import cli
    from extensions_lib.ui import app

    calls = []
    monkeypatch.setattr(app, "launch", lambda runner, context, **kw: calls.append((context, kw)))
    common = ["ui", "--data-dir", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(common + ["--port", "7999"]) == 0
    assert cli.main(common + ["--listen"]) == 0
    assert [(kw["host"], kw["port"]) for _, kw in calls] == [("127.0.0.1", 7999), ("0.0.0.0", 7861)]
    context = calls[0][0]
    assert context.embeddings_dir == tmp_path / "data" / "embeddings"
    assert context.defaults[GenerationOptions].width == 128  # the demo model's small defaults
    assert cli.main(["ui", "--ckpt", str(tmp_path / "missing.ckpt")]) == 1
