"""`alchemy tags`: list/add/remove/replace/undo from the shell, through the real dispatcher."""
from __future__ import annotations

import pytest

from extensions_lib.cli import main
from tests.test_tag_editor import CAPTIONS, caption, make_dataset


@pytest.fixture
def ds(tmp_path):
    return make_dataset(tmp_path / "ds")


def test_help_for_every_action(capsys):
    for action in ("list", "add", "remove", "replace", "undo", "redo", "history"):
        with pytest.raises(SystemExit) as exit_info:
            main(["tags", action, "--help"])
        assert exit_info.value.code == 0
    assert "--regex" in capsys.readouterr().out


def test_list_counts_with_filters(ds, capsys):
    assert main(["tags", "list", str(ds)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["2\t1girl", "2\tsmile"] and lines[-1] == "6 tags in 4 of 4 captions"
    assert main(["tags", "list", str(ds), "--include", "smile", "--exclude", "1boy", "--sort", "name"]) == 0
    assert capsys.readouterr().out.splitlines() == ["1\t1girl", "1\tlong hair", "1\tsmile",
                                                    "3 tags in 1 of 4 captions"]
    assert main(["tags", "list", str(ds), "--include", "1girl,1boy", "--include-mode", "or", "--images"]) == 0
    assert [l.split("\t")[0] for l in capsys.readouterr().out.splitlines()] == ["a.png", "b.png", "c.png"]


def test_replace_dry_run_then_apply_then_undo(ds, capsys):
    assert main(["tags", "replace", str(ds), r"(\w+) hair", r"hair (\1)", "--regex", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "+ 1girl, hair (long), smile" in out and "would change 2 of 4" in out
    assert caption(ds, "a.png") == CAPTIONS["a.png"]
    assert main(["tags", "replace", str(ds), r"(\w+) hair", r"hair (\1)", "--regex"]) == 0
    assert caption(ds, "b.png") == "1girl, hair (short)"
    assert main(["tags", "add", str(ds), "masterpiece", "--position", "prepend", "--image", "c.png"]) == 0
    assert caption(ds, "c.png") == "masterpiece, 1boy, smile, hat"
    assert main(["tags", "undo", str(ds)]) == 0 and main(["tags", "undo", str(ds)]) == 0
    assert [caption(ds, n) for n in ("a.png", "b.png", "c.png")] == [CAPTIONS[n] for n in ("a.png", "b.png", "c.png")]
    capsys.readouterr()
    assert main(["tags", "history", str(ds)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_remove_refuses_to_empty_and_exits_3(ds, capsys):
    assert main(["tags", "remove", str(ds), "1girl, short hair"]) == 3
    assert "empty" in capsys.readouterr().out
    assert caption(ds, "b.png") == CAPTIONS["b.png"] and caption(ds, "a.png") == "long hair, smile"


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["tags", "list", str(tmp_path / "nope")]) == 1
    assert "dataset folder not found" in capsys.readouterr().err
    make_dataset(tmp_path / "ds")
    assert main(["tags", "replace", str(tmp_path / "ds"), "(", "x", "--regex"]) == 1
    assert "bad regular expression" in capsys.readouterr().err


def test_list_search_top_and_token_column(ds, capsys):
    from extensions_lib.backend.tokenizer import make_tokenizer

    assert main(["tags", "list", str(ds), "--search", "HAIR"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["1\tlong hair", "1\tshort hair"]
    assert main(["tags", "list", str(ds), "--sort", "tokens", "--top", "1"]) == 0
    first = capsys.readouterr().out.splitlines()[0].split("\t")
    tok = make_tokenizer("open_clip")
    longest = max(CAPTIONS["a.png"].split(", ") + CAPTIONS["b.png"].split(", ") + CAPTIONS["c.png"].split(", "),
                  key=lambda t: (len(tok.tokenize([t])[0]), [-ord(c) for c in t]))
    assert first[2] == longest and int(first[1]) == len(tok.tokenize([longest])[0])
