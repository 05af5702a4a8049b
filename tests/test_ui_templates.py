"""Prompt templates by the WebUI's names: the shipped set is the host's own, the host's folder wins."""
from __future__ import annotations

import pytest

from extensions_lib.errors import AlchemyError
from extensions_lib.train.dataset import load_template
from extensions_lib.jobs.context import UIContext

# The WebUI v1.10.1 `textual_inversion_templates/` folder: file -> (line count, first line).
WEBUI_TEMPLATES = {
    "hypernetwork.txt": (27, "a photo of a [filewords]"),
    "none.txt": (1, "picture"),
    "style.txt": (19, "a painting, art by [name]"),
    "style_filewords.txt": (17, "a bright painting of [filewords], art by [name]"),
    "subject.txt": (27, "a photo of a [name]"),
    "subject_filewords.txt": (27, "a photo of a [name], [filewords]"),
}


def test_the_webuis_template_set_is_shipped_and_found_by_its_names():
    context = UIContext()
    assert set(context.template_choices()) >= {name[:-4] for name in WEBUI_TEMPLATES}
    for file_name, (count, first) in WEBUI_TEMPLATES.items():
        for given in (file_name, file_name[:-4]):
            template = load_template(context.resolve_template(given), require_name=False)
            assert len(template.lines) == count and template.lines[0] == first


def test_the_hosts_folder_wins_and_is_searched_recursively(tmp_path):
    folder = tmp_path / "textual_inversion_templates"
    (folder / "mine").mkdir(parents=True)
    (folder / "hypernetwork.txt").write_text("edited by the user [filewords]\n")
    (folder / "mine" / "portrait.txt").write_text("a portrait of [name]\n")
    context = UIContext(templates_dir=folder)
    assert "portrait" in context.template_choices() and "hypernetwork" in context.template_choices()
    assert load_template(context.resolve_template("hypernetwork"), require_name=False).lines == (
        "edited by the user [filewords]",)
    assert context.resolve_template("portrait.txt") == str(folder / "mine" / "portrait.txt")
    assert context.resolve_template(str(folder / "mine" / "portrait.txt")) == str(folder / "mine" / "portrait.txt")


@pytest.mark.parametrize("given", ["nope", "", "sub/none.txt"])
def test_an_unknown_template_names_the_choices(given):
    with pytest.raises(AlchemyError) as err:
        UIContext().resolve_template(given)
    assert "hypernetwork" in err.value.fix and "style_filewords" in err.value.fix
