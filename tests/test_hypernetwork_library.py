"""Hypernetworks folder listing (recursive, by stem, refreshed by mtime, bad files skipped with a reason),
the <hypernet:name:mult> prompt syntax and the Create options."""
from __future__ import annotations

import argparse
import os
import shutil

import pytest
import torch

from extensions_lib.errors import AlchemyError
from extensions_lib.formats.torch_pt import save_pt
from extensions_lib.hypernetworks import library as library_module
from extensions_lib.hypernetworks.file import to_file_dict, write_hypernetwork
from extensions_lib.hypernetworks.library import HypernetworkLibrary
from extensions_lib.hypernetworks.module import Architecture, Hypernetwork
from extensions_lib.hypernetworks.options import (ACTIVATION_CHOICES, CreateHypernetworkOptions, SIZE_CHOICES,
                                                  architecture)
from extensions_lib.hypernetworks.prompt import parse_hypernet_tags
from extensions_lib.options import add_cli_arguments, from_cli, specs


def small(name, sizes=(8,), activation="relu"):
    return Hypernetwork.create(name, list(sizes), Architecture((1, 2, 1), activation))


def bump_mtime(path):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


@pytest.fixture()
def counted_reads(monkeypatch):
    calls = []
    real = library_module.read_hypernetwork

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(library_module, "read_hypernetwork", counting)
    return calls


def test_recursive_listing_by_stem_in_host_order(tmp_path):
    write_hypernetwork(small("b"), tmp_path / "B.pt")
    write_hypernetwork(small("a"), tmp_path / "sub" / "a.pt")
    write_hypernetwork(small("c", sizes=(8, 16)), tmp_path / "sub" / "deeper" / "c.pt")
    (tmp_path / "notes.txt").write_text("not a model")
    save_pt({"emb_params": torch.zeros(1, 8)}, tmp_path / "other.safetensors.bak")
    lib = HypernetworkLibrary(tmp_path)
    assert lib.names() == ["B", "a", "c"]  # sorted by lower-cased path: b.pt < sub/a.pt < sub/deeper/c.pt
    assert lib.path("c") == tmp_path / "sub" / "deeper" / "c.pt"
    assert {e.name: e.widths for e in lib.entries()} == {"B": (8,), "a": (8,), "c": (8, 16)}
    assert lib.skipped == []
    assert lib.load("c").sizes == [8, 16]


def test_listing_matches_the_hosts_glob(tmp_path):
    """The host lists ``glob.iglob(dir/**/*.pt, recursive=True)`` sorted by lower-cased path, by stem:
    hidden files and folders are not listed."""
    import glob

    for rel in ("Zeta.pt", "alpha.pt", "sub/Beta.pt", "sub/.cache/gamma.pt", ".hidden.pt", ".trash/delta.pt",
                "sub/deeper/eps.pt"):
        write_hypernetwork(small("x"), tmp_path / rel)
    host = [os.path.splitext(os.path.basename(f))[0]
            for f in sorted(glob.iglob(os.path.join(tmp_path, "**/*.pt"), recursive=True), key=str.lower)]
    lib = HypernetworkLibrary(tmp_path)
    assert lib.names() == host == ["alpha", "Beta", "eps", "Zeta"]
    assert lib.skipped == []


def test_bad_files_are_listed_as_skipped_with_reasons(tmp_path):
    write_hypernetwork(small("good"), tmp_path / "good.pt")
    bad = to_file_dict(small("x"))
    bad["activation_func"] = "nosuch"
    save_pt(bad, tmp_path / "badact.pt")
    bad = to_file_dict(small("x"))
    bad["layer_structure"] = [1.0, 2.0, 2.0]
    save_pt(bad, tmp_path / "badstructure.pt")
    save_pt({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(1, 768)}, "name": "e"},
            tmp_path / "an-embedding.pt")
    save_pt({"lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}, tmp_path / "a-lora.pt")
    (tmp_path / "noise.pt").write_bytes(os.urandom(1000))
    (tmp_path / "empty.pt").write_bytes(b"")

    lib = HypernetworkLibrary(tmp_path)
    assert lib.names() == ["good"]
    reasons = {e.name: e.error for e in lib.skipped}
    assert set(reasons) == {"badact", "badstructure", "an-embedding", "a-lora", "noise", "empty"}
    assert "nosuch" in reasons["badact"]
    assert "start and end with 1" in reasons["badstructure"]
    assert "embedding" in reasons["an-embedding"]
    assert "LoRA" in reasons["a-lora"]
    assert "not a readable" in reasons["noise"] and "not a readable" in reasons["empty"]
    with pytest.raises(AlchemyError, match="skipped") as exc:
        lib.load("a-lora")
    assert "LoRA" in str(exc.value)
    with pytest.raises(AlchemyError, match="no hypernetwork named 'missing'"):
        lib.load("missing")


def test_refresh_rereads_only_changed_files(tmp_path, counted_reads):
    for name in ("one", "two", "three"):
        write_hypernetwork(small(name), tmp_path / f"{name}.pt")
    lib = HypernetworkLibrary(tmp_path)
    assert len(counted_reads) == 3
    first = lib.load("one")
    assert lib.load("one") is first  # reused while unchanged
    counted_reads.clear()

    assert lib.refresh() is False and counted_reads == []

    write_hypernetwork(small("four"), tmp_path / "sub" / "four.pt")
    assert lib.refresh() is True
    assert counted_reads == [tmp_path / "sub" / "four.pt"] and "four" in lib.names()
    counted_reads.clear()

    changed = small("one", sizes=(8, 32))
    write_hypernetwork(changed, tmp_path / "one.pt")
    bump_mtime(tmp_path / "one.pt")
    assert lib.refresh() is True
    assert counted_reads == [tmp_path / "one.pt"]
    assert lib.load("one") is not first and lib.load("one").sizes == [8, 32]

    (tmp_path / "two.pt").unlink()
    shutil.rmtree(tmp_path / "sub")
    assert lib.refresh() is True
    assert lib.names() == ["one", "three"]

    (tmp_path / "three.pt").write_bytes(b"garbage")  # a good file turning bad is noticed too
    bump_mtime(tmp_path / "three.pt")
    lib.refresh()
    assert lib.names() == ["one"] and [e.name for e in lib.skipped] == ["three"]


def test_same_name_twice_keeps_the_last_like_the_host_and_says_so(tmp_path):
    write_hypernetwork(small("x", sizes=(8,)), tmp_path / "a" / "x.pt")
    write_hypernetwork(small("x", sizes=(16,)), tmp_path / "b" / "x.pt")
    write_hypernetwork(small("none"), tmp_path / "None.pt")
    lib = HypernetworkLibrary(tmp_path)
    assert lib.names() == ["x"] and lib.path("x") == tmp_path / "b" / "x.pt"
    reasons = {str(e.path): e.error for e in lib.skipped}
    assert "same name" in reasons[str(tmp_path / "a" / "x.pt")]
    assert "reserved" in reasons[str(tmp_path / "None.pt")]


def test_find_picks_the_file_the_library_and_the_host_pick(tmp_path):
    from extensions_lib.hypernetworks.library import find

    write_hypernetwork(small("x", sizes=(8,)), tmp_path / "a" / "x.pt")
    write_hypernetwork(small("x", sizes=(16,)), tmp_path / "b" / "x.pt")
    write_hypernetwork(small("y"), tmp_path / "y.pt")
    write_hypernetwork(small("none"), tmp_path / "None.pt")
    lib = HypernetworkLibrary(tmp_path)
    assert find(tmp_path, "x") == lib.path("x") == tmp_path / "b" / "x.pt"
    assert find(tmp_path, "y") == lib.path("y")
    for missing in ("None", "z"):
        with pytest.raises(AlchemyError, match=f"no hypernetwork named '{missing}'") as exc:
            find(tmp_path, missing)
        assert str(tmp_path) in str(exc.value) and "found: x, y" in str(exc.value)
    with pytest.raises(AlchemyError, match="no hypernetwork named"):
        find(tmp_path / "absent", "x")


def test_missing_folder_lists_nothing(tmp_path):
    lib = HypernetworkLibrary(tmp_path / "nope")
    assert lib.names() == [] and lib.skipped == []
    write_hypernetwork(small("late"), tmp_path / "nope" / "late.pt")
    assert lib.refresh() is True and lib.names() == ["late"]


# ---- prompt syntax -----------------------------------------------------------------------------------------

def test_prompt_tags_are_removed_and_returned_in_order():
    prompt = "a cat <hypernet:foo:0.5> on <lora:bar:1> a mat<hypernet:baz>, <hypernet:my net:-0.25:extra=1>"
    text, found = parse_hypernet_tags(prompt)
    assert text == "a cat  on <lora:bar:1> a mat, "
    assert found == [("foo", 0.5), ("baz", 1.0), ("my net", -0.25)]
    assert parse_hypernet_tags("no tags here") == ("no tags here", [])


@pytest.mark.parametrize("prompt,match", [("<hypernet:foo:strong>", "not a number"),
                                          ("<hypernet::0.5>", "no hypernetwork name"),
                                          ("<hypernet:foo:inf>", "not a number")])
def test_bad_prompt_tags_are_refused(prompt, match):
    with pytest.raises(AlchemyError, match=match):
        parse_hypernet_tags(prompt)


# ---- create options ----------------------------------------------------------------------------------------

def test_create_options_defaults_are_the_webui_create_tab():
    o = CreateHypernetworkOptions()
    assert (o.name, o.sizes, o.layer_structure, o.activation, o.weight_init) == \
        ("", [768, 320, 640, 1280], "1, 2, 1", "linear", "Normal")
    assert (o.layer_norm, o.use_dropout, o.dropout_structure, o.activate_output, o.last_layer_dropout,
            o.overwrite) == (False, False, "0, 0, 0", False, False, False)
    by_name = {s.name: s for s in specs(CreateHypernetworkOptions)}
    assert by_name["sizes"].choices == SIZE_CHOICES == [768, 1024, 320, 640, 1280]
    assert by_name["weight_init"].choices == ["Normal", "KaimingUniform", "KaimingNormal", "XavierUniform",
                                              "XavierNormal"]
    assert ACTIVATION_CHOICES[:7] == ["linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid"]
    assert "hardswish" not in ACTIVATION_CHOICES and "multiheadattention" not in ACTIVATION_CHOICES


def test_create_options_from_the_command_line():
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser, CreateHypernetworkOptions)
    o = from_cli(CreateHypernetworkOptions, parser.parse_args(
        ["--name", "n", "--sizes", "320", "--sizes", "1024", "--activation", "swish", "--layer-norm"]))
    assert (o.sizes, o.activation, o.layer_norm) == ([320, 1024], "swish", True)
    with pytest.raises(AlchemyError, match="sizes"):
        from_cli(CreateHypernetworkOptions, parser.parse_args(["--sizes", "512"]))


def test_dropout_resolution():
    assert architecture(CreateHypernetworkOptions()).dropout_structure == (0, 0, 0)
    assert architecture(CreateHypernetworkOptions(layer_structure="1, 2, 2, 1", use_dropout=True,
                                                  dropout_structure="")).dropout_structure == (0, 0.3, 0, 0)
    assert architecture(CreateHypernetworkOptions(layer_structure="1, 2, 2, 1", use_dropout=True, dropout_structure="",
                                                  last_layer_dropout=True)).dropout_structure == (0, 0.3, 0.3, 0)
    assert architecture(CreateHypernetworkOptions(use_dropout=True, dropout_structure="0, 0.1, 0")
                        ).dropout_structure == (0.0, 0.1, 0.0)
    with pytest.raises(AlchemyError, match="last layer dropout"):
        architecture(CreateHypernetworkOptions(layer_structure="1, 2, 2, 1", use_dropout=True,
                                               dropout_structure="0, 0.1, 0, 0", last_layer_dropout=True))


@pytest.mark.needs_gradio
def test_create_options_render_as_gradio_components_and_come_back():
    gr = pytest.importorskip("gradio")
    from extensions_lib.options import from_ui_values, gradio_components

    with gr.Blocks():
        comps = gradio_components(CreateHypernetworkOptions)
    assert comps["sizes"].multiselect and comps["sizes"].value == [768, 320, 640, 1280]
    assert comps["activation"].value == "linear" and comps["layer_norm"].value is False
    names = list(comps)
    values = [comps[n].value for n in names]
    assert from_ui_values(CreateHypernetworkOptions, names, values) == CreateHypernetworkOptions()
