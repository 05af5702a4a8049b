"""The method registry: a method registered in one place (one line in ``METHOD_MODULES``) shows up in the
CLI, the settings, the HTTP API, the host's unsupported-tab list and the training tabs; the two built-in
methods keep their commands, settings keys and API routes."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from extensions_lib import cli
from extensions_lib.host import settings as st
from extensions_lib.methods import registry
from toy_method import TOY_STEPS, ToyTrainOptions


@pytest.fixture
def with_toy(monkeypatch):
    """The toy registered the way a real method is: its module added to METHOD_MODULES."""
    monkeypatch.setattr(registry, "METHOD_MODULES", (*registry.METHOD_MODULES, "toy_method"))


def _context(tmp_path, **kw):
    from extensions_lib.jobs.context import UIContext

    return UIContext(model=lambda: object(), embeddings_dir=tmp_path / "emb", hypernetworks_dir=tmp_path / "hn",
                     log_root=tmp_path, folders={"toys": tmp_path / "toys"}, **kw)


def test_builtin_methods_are_registered_in_order():
    assert [m.key for m in registry.methods()] == ["embedding", "hypernetwork"]
    assert registry.find("hypernetwork").name_option == "hypernetwork_name"
    with pytest.raises(Exception, match="use one of: embedding, hypernetwork"):
        registry.find("dreambooth")


def test_a_spec_naming_an_option_its_class_lacks_is_refused():
    with pytest.raises(ValueError, match="no option 'nope'"):
        registry.MethodSpec(key="bad", title="Bad", noun="bad", train_options=ToyTrainOptions, name_option="nope",
                            folder="toys", train_job=print, train_tab=print, cli="toy_method")


def test_registered_method_gets_a_cli_command(with_toy, tmp_path, capsys):
    parser, problems = cli.build_parser()
    assert problems == []
    assert "toy" in parser.format_help() and "embedding" in parser.format_help()
    code = cli.main(["toy", "train", "--toy-name", "t1", "--toy-dir", str(tmp_path), "--wiggle", "0.75"])
    assert code == 0
    written = tmp_path / "t1.toy"
    assert capsys.readouterr().out.strip() == str(written)
    saved = json.loads(written.read_text())
    assert saved["wiggle"] == 0.75 and saved["steps"] == TOY_STEPS


def test_registered_method_gets_settings_without_renaming_the_others(with_toy):
    without = st.training_keys({k: v for k, v in st.training_methods().items() if k != "toy"})
    keys = st.training_keys()
    for cls, mapping in without.items():
        assert keys[cls] == mapping  # the built-in methods' saved settings stay where they were
    toy = keys[ToyTrainOptions]
    assert toy["learn_rate"] == "alchemy_train_toy_learn_rate"
    assert toy["steps"] == "alchemy_train_toy_steps"  # its own default differs from the shared one
    assert toy["batch_size"] == "alchemy_train_batch_size"  # same default: the shared key

    settings = {s.key: s for s in st.all_settings(lambda: [])}
    assert settings["alchemy_train_toy_steps"].default == TOY_STEPS
    assert settings["alchemy_train_toy_learn_rate"].label == "Toy: Learning rate"

    saved = SimpleNamespace(alchemy_train_toy_steps=11, alchemy_train_batch_size=3)
    defaults, problems = st.all_defaults(saved)
    assert problems == []
    assert defaults[ToyTrainOptions].steps == 11 and defaults[ToyTrainOptions].batch_size == 3
    assert defaults[ToyTrainOptions].wiggle == 0.5


def test_registered_method_gets_an_api_route(with_toy, tmp_path):
    from extensions_lib.host.api import AlchemyApi, NotFound
    from extensions_lib.jobs.thread_runner import ThreadJobRunner

    data = tmp_path / "data"
    data.mkdir()
    changed = []
    context = _context(tmp_path, files_changed=changed.append)
    api = AlchemyApi(ThreadJobRunner(), lambda: context, lambda: [], lambda: [])
    status, body = api.train("toy", {"options": {"toy_name": "t2", "data_root": str(data), "wiggle": 0.25},
                                     "wait": True})
    assert status == 200, body
    written = tmp_path / "toys" / "t2.toy"
    assert body["final_path"] == str(written) and body["state"] == "done"
    saved = json.loads(written.read_text())
    assert saved["wiggle"] == 0.25 and saved["steps"] == TOY_STEPS
    assert saved["toy_dir"] == str(tmp_path / "toys")  # the host's folder for the toy's folder kind
    assert changed == ["toys"]
    with pytest.raises(NotFound, match="unknown training method 'nope'") as info:
        api.train("nope", {})
    assert "toy" in info.value.fix


def test_registered_method_tabs_are_marked_unsupported_like_the_others(with_toy):
    from extensions_lib.host.handles import HostHandles

    lowvram = HostHandles(extension_root=None, shared=SimpleNamespace(cmd_opts=SimpleNamespace(lowvram=True)),
                          sd_models=object(), call_queue=SimpleNamespace(wrap_gradio_gpu_call=print))
    assert sorted(lowvram.unsupported()) == ["train_embedding", "train_hypernetwork", "train_toy"]
    no_model = HostHandles(extension_root=None, call_queue=SimpleNamespace(wrap_gradio_gpu_call=print))
    assert sorted(no_model.unsupported()) == ["create_embedding", "train_embedding", "train_hypernetwork",
                                              "train_toy"]  # creating a toy needs no model


@pytest.mark.needs_gradio
def test_registered_method_gets_its_tabs(with_toy, tmp_path):
    gr = pytest.importorskip("gradio")
    from extensions_lib.jobs.thread_runner import ThreadJobRunner
    from extensions_lib.ui import build_train_tabs

    (tmp_path / "toys").mkdir()
    (tmp_path / "toys" / "old.toy").write_text("{}")
    with gr.Blocks() as demo:
        with gr.Tabs():
            build_train_tabs(ThreadJobRunner(), _context(tmp_path), title_prefix="A: ")
    tabs = [b for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    assert [t.elem_id for t in tabs] == [
        "alchemy_create_embedding_tab", "alchemy_create_hypernetwork_tab", "alchemy_create_toy_tab",
        "alchemy_train_embedding_tab", "alchemy_train_hypernetwork_tab", "alchemy_train_toy_tab"]
    assert tabs[-1].label == "A: Train toy"
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert by_id["alchemy_train_toy_toy_name"].choices == ["old"]  # the folder's files to pick from
    assert "alchemy_train_toy_wiggle" in by_id  # its own options rendered

    # the create tab runs the toy's create job (instant: no model, no runner)
    button = by_id["alchemy_create_toy_start"]
    fn, inputs = next((fn.fn, [demo.blocks[i] for i in dep["inputs"]])
                      for dep, fn in zip(demo.dependencies, demo.fns) if button._id in dep["targets"])
    assert fn("new") == f"Created: {tmp_path / 'toys' / 'new.toy'}"
    assert json.loads((tmp_path / "toys" / "new.toy").read_text()) == {"created": True}
