"""Loading scripts/alchemy.py the way the WebUI does: callbacks, settings, tabs, and failing soft."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from webui_standin.harness import EXTENSION_ROOT, standin_host

OUR_CALLBACKS = ("ui_settings", "ui_train_tabs", "ui_tabs", "model_loaded", "script_unloaded", "app_started")


def _ours(host, category):
    return [c for c in host.script_callbacks.callback_map[f"callbacks_{category}"]
            if c.script.endswith("alchemy.py")]


def test_scripts_register_every_callback_and_leave_sys_path_alone(tmp_path):
    with standin_host(tmp_path) as host:
        path_before = list(sys.path)
        always_on = host.load_scripts()
        assert host.scripts.load_errors == []
        assert sys.path == path_before
        for category in OUR_CALLBACKS:
            (callback,) = _ours(host, category)
            assert callback.name == f"alchemy.py/{category}/alchemy_on_{category}"
        assert sorted(s.title() for s in always_on) == ["Alchemy", "Alchemy aesthetic gradients"]
        assert next(s for s in always_on if s.title() == "Alchemy").ui(False) == []
        # A second load (Reload UI) starts from cleared callbacks and registers once again.
        host.script_callbacks.script_unloaded_callback()
        host.load_scripts()
        assert all(len(_ours(host, c)) == 1 for c in OUR_CALLBACKS)


def test_settings_section_is_rendered_from_the_option_dataclasses(tmp_path):
    pytest.importorskip("gradio")
    from extensions_lib.embeddings.options import EmbeddingTrainOptions
    from extensions_lib.hypernetworks.train_options import HypernetworkTrainOptions
    from extensions_lib.options import specs
    from extensions_lib.tagger.options import CaptionOptions

    import torch

    from extensions_lib.hypernetworks.file import write_hypernetwork
    from extensions_lib.hypernetworks.module import Architecture, Hypernetwork

    def hypernetwork(folder, name):
        write_hypernetwork(Hypernetwork.create(name, [32], Architecture(layer_structure=[1, 2, 1])), folder / f"{name}.pt")

    with standin_host(tmp_path) as host:
        hypernetwork(tmp_path / "models" / "hypernetworks", "hosts")  # the WebUI's folder
        hypernetwork(tmp_path / "ours", "mine")
        host.shared.reload_hypernetworks()
        host.shared.opts.data["alchemy_hypernetworks_dir"] = str(tmp_path / "ours")
        host.load_scripts()
        host.script_callbacks.ui_settings_callback()
        assert host.script_callbacks.errors == []
        labels = host.shared.opts.data_labels
        ours = {k: v for k, v in labels.items() if k.startswith("alchemy_")}
        assert all(v.section == ("alchemy", "Alchemy") and v.category_id == "training" for v in ours.values())
        toggle = ours["alchemy_hypernetwork"]
        assert toggle.default == "None" and toggle.infotext == "Hypernet"
        assert toggle.component_args()["choices"] == ["None", "hosts", "mine"]
        assert callable(toggle.refresh)
        hypernetwork(tmp_path / "ours", "later")
        toggle.refresh()
        assert toggle.component_args()["choices"] == ["None", "hosts", "later", "mine"]
        assert ours["alchemy_hypernetwork_strength"].infotext == "Hypernet strength"
        assert ours["alchemy_hypernetwork_strength"].component_args == {"minimum": 0.0, "maximum": 1.0, "step": 0.001}
        # Tagger defaults: one setting per UI option, with the declared default and bounds.
        for spec in specs(CaptionOptions):
            info = ours[f"alchemy_tagger_{spec.name}"]
            assert info.default == ("" if spec.default is None else
                                    ", ".join(spec.default) if spec.multiple else spec.default)
        # The methods disagree on the learning rate: one setting each; they agree on the batch size: one.
        assert ours["alchemy_train_embedding_learn_rate"].default == EmbeddingTrainOptions().learn_rate == "0.005"
        assert ours["alchemy_train_hypernetwork_learn_rate"].default == HypernetworkTrainOptions().learn_rate
        assert "alchemy_train_learn_rate" not in ours and "alchemy_train_batch_size" in ours
        assert host.shared.opts.alchemy_train_batch_size == 1
        # Every entry builds as the settings page builds it (component, its arguments, the stored value).
        import gradio as gr

        with gr.Blocks():
            for key, info in ours.items():
                args = info.component_args() if callable(info.component_args) else info.component_args or {}
                default = {bool: gr.Checkbox, int: gr.Number, float: gr.Number}.get(type(info.default), gr.Textbox)
                component = (info.component or default)(label=info.label, value=host.shared.opts.data[key],
                                                        elem_id=key, **args)
                # What the settings page stores is the component's preprocess of the number the browser
                # sends: integer options must come back as integers (e.g. to /sdapi/v1/options).
                if type(info.default) is int:
                    assert type(component.preprocess(info.default)) is int, key


def test_saved_settings_become_the_tabs_defaults(tmp_path):
    from extensions_lib.embeddings.options import EmbeddingTrainOptions
    from extensions_lib.hypernetworks.train_options import HypernetworkTrainOptions
    from extensions_lib.tagger.options import CaptionOptions, TagRunOptions

    with standin_host(tmp_path) as host:
        extension = _extension(host)
        opts = host.shared.opts
        opts.data.update({"alchemy_train_batch_size": 3, "alchemy_train_hypernetwork_learn_rate": "2e-6",
                          "alchemy_train_steps": "many", "alchemy_tagger_general_threshold": "0.4",
                          "alchemy_tagger_exclude": "a, b", "alchemy_tagger_model": "wd-tiny",
                          "alchemy_embeddings_dir": "my-embeddings"})
        context = extension.context()
        ti, hn = context.defaults_for(EmbeddingTrainOptions), context.defaults_for(HypernetworkTrainOptions)
        assert (ti.batch_size, hn.batch_size) == (3, 3)
        assert (ti.learn_rate, hn.learn_rate) == ("0.005", "2e-6")
        assert ti.steps == EmbeddingTrainOptions().steps  # "many" is not a number: ignored, and said so
        assert any("alchemy_train_steps" in problem for problem in extension.problems)
        caption = context.defaults_for(CaptionOptions)
        assert caption.general_threshold == 0.4 and caption.exclude == ["a", "b"]
        assert context.defaults_for(TagRunOptions).model == "wd-tiny"
        assert context.embeddings_dir == tmp_path / "my-embeddings"
        assert context.hypernetworks_dir == Path(host.shared.cmd_opts.hypernetwork_dir)


def _extension(host):
    """Load our script and return its AlchemyExtension (the module-level object the callbacks close over)."""
    host.load_scripts()
    module = next(m for _cls, path, m in host.scripts.scripts_data if path.endswith("alchemy.py"))
    return module._extension


@pytest.mark.needs_gradio
def test_tabs_build_inside_the_train_tab_and_as_our_own_tab(tmp_path):
    gr = pytest.importorskip("gradio")
    with standin_host(tmp_path) as host:
        host.load_scripts()
        host.script_callbacks.ui_settings_callback()
        with gr.Blocks() as demo:
            preview = [gr.Textbox(), gr.Textbox(), gr.Slider(), gr.Dropdown(), gr.Slider(), gr.Number(), gr.Slider(),
                       gr.Slider()]
            with gr.Tabs(elem_id="train_tabs"):
                host.script_callbacks.ui_train_tabs_callback(host.script_callbacks.UiTrainTabParams(preview))
        tabs = host.script_callbacks.ui_tabs_callback()
        assert host.script_callbacks.errors == []
        ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
        assert {"alchemy_train_embedding_tab", "alchemy_train_hypernetwork_tab"} <= ids
        assert "alchemy_train_embedding_preview_prompt" not in ids  # read from txt2img instead
        [(block, title, elem_id)] = tabs
        assert (title, elem_id) == ("Alchemy", "alchemy")
        ids = {getattr(b, "elem_id", None) for b in block.blocks.values()}
        assert {"alchemy_tagger_tab", "alchemy_preprocess_tab"} <= ids
        assert "alchemy_train_embedding_tab" not in ids


@pytest.mark.needs_gradio
def test_fail_soft_without_train_sub_tabs_or_gpu_queue(tmp_path):
    gr = pytest.importorskip("gradio")
    with standin_host(tmp_path, missing=("on_ui_train_tabs", "modules.call_queue")) as host:
        extension = _extension(host)
        assert host.scripts.load_errors == []
        assert "on_ui_train_tabs" in extension.h.missing_callbacks and "call_queue" in extension.h.missing
        [(block, _title, _id)] = host.build_ui()
        assert host.script_callbacks.errors == []
        html = " ".join(str(getattr(b, "value", "")) for b in block.blocks.values())
        assert "on_ui_train_tabs is missing" in html and "modules.call_queue" in html
        ids = {getattr(b, "elem_id", None) for b in block.blocks.values()}
        assert "alchemy_train_embedding_tab" in ids  # moved into our own tab
        assert "alchemy_train_embedding_start" not in ids  # but unsupported without the queue: a note instead
        assert "train_embedding" in extension.context().unsupported
        assert "tagger" not in extension.context().unsupported


def test_a_failing_callback_never_reaches_the_host(tmp_path):
    with standin_host(tmp_path) as host:
        host.load_scripts()
        host.script_callbacks.app_started_callback(None, object())  # not a FastAPI app: our code fails
        assert host.script_callbacks.errors == []  # ... and says so in the log, not in the host


def test_outside_the_webui_the_glue_imports_and_does_nothing():
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('alchemy.py', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(m._extension, m._problem is not None, hasattr(m, 'AlchemyScript'))")
    out = subprocess.run([sys.executable, "-c", code, str(EXTENSION_ROOT / "scripts" / "alchemy.py")],
                         capture_output=True, text=True, cwd=str(EXTENSION_ROOT), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "True", "False"]


def test_model_loaded_before_scripts_is_picked_up(tmp_path, tiny_checkpoint):
    """Reload UI with a model loaded fires no on_model_loaded: the glue handles "already loaded" itself."""
    from extensions_lib.formats.embedding import Embedding, write_embedding

    import torch

    folder = tmp_path / "ours"
    write_embedding(Embedding("zqxstyle", torch.randn(1, 32)), folder / "zqxstyle.pt")
    with standin_host(tmp_path) as host:
        host.load_model(tiny_checkpoint("sd1"))
        host.shared.opts.data["alchemy_embeddings_dir"] = str(folder)
        host.load_scripts()
        db = host.sd_hijack.model_hijack.embedding_db
        assert "zqxstyle" in db.word_embeddings
        assert str(folder) in db.embedding_dirs


def test_hosts_before_1_9_take_no_callback_names(tmp_path):
    """Registrars of older hosts accept only the callback: we register anyway, once each."""
    with standin_host(tmp_path) as host:
        for category in OUR_CALLBACKS:
            newer = getattr(host.script_callbacks, f"on_{category}")
            setattr(host.script_callbacks, f"on_{category}", lambda callback, _newer=newer: _newer(callback))
        extension = _extension(host)
        assert host.scripts.load_errors == [] and extension.h.missing_callbacks == []
        for category in OUR_CALLBACKS:
            (callback,) = _ours(host, category)
            assert callback.name == f"alchemy.py/{category}"


def test_what_a_missing_callback_or_module_turns_off_is_said_in_our_tab(tmp_path, caplog):
    with standin_host(tmp_path, missing=("on_app_started",)) as host:
        extension = _extension(host)
        notes = " ".join(extension.notes())
        assert "script_callbacks.on_app_started" in notes and "Without on_app_started: no live progress" in notes
    caplog.clear()
    with standin_host(tmp_path, missing=("modules.shared",)) as host:
        extension = _extension(host)
        host.script_callbacks.ui_settings_callback()
        assert host.script_callbacks.errors == []
        assert not [r for r in caplog.records if r.name == "alchemy" and r.levelname == "ERROR"]  # no traceback
        notes = " ".join(extension.notes())
        assert "modules.shared" in notes and "Without on_ui_settings: no Alchemy section in Settings" in notes


@pytest.mark.needs_gradio
def test_tabs_without_a_loaded_checkpoint_say_so_and_write_nothing(tmp_path):
    gr = pytest.importorskip("gradio")
    with standin_host(tmp_path) as host:
        host.load_scripts()
        with gr.Blocks() as demo:
            with gr.Tabs(elem_id="train_tabs"):
                host.script_callbacks.ui_train_tabs_callback(host.script_callbacks.UiTrainTabParams([]))
        assert host.script_callbacks.errors == []
        blocks = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}

        def click(button_id, first_value):
            button = blocks[button_id]
            for dep, fn in zip(demo.dependencies, demo.fns):
                if button._id in dep["targets"] and dep["trigger"] == "click":
                    values = [demo.blocks[i].value for i in dep["inputs"]]
                    return fn.fn(first_value, *values[1:])
            raise AssertionError(button_id)

        for button, name in (("alchemy_create_embedding_start", "newemb"), ("alchemy_train_embedding_start", "newemb"),
                             ("alchemy_train_hypernetwork_start", "newhn")):
            out = click(button, name)
            text = out if isinstance(out, str) else out[0]
            assert text.startswith("Failed:") and "no Stable Diffusion checkpoint is loaded" in text, text
            assert "choose a checkpoint at the top of the WebUI" in text
        assert not (tmp_path / "embeddings").exists() and not (tmp_path / "textual_inversion").exists()
