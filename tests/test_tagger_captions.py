"""Caption rules: each option gives exactly the expected text (hand-worked from fixed scores)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from extensions_lib.errors import AlchemyError
from extensions_lib.tagger.captions import (mcut_threshold, merge_caption, render_caption,
                                            split_caption, tag_key)
from extensions_lib.tagger.labels import Labels, read_selected_tags
from extensions_lib.tagger.options import DEEPDANBOORU_THRESHOLDS, CaptionOptions
from tagger_models import tag_rows, write_selected_tags

# Scores are exact binary fractions so "at the threshold" is unambiguous in float32.
ROWS = [
    ("general", 9, 0.125), ("sensitive", 9, 0.75), ("questionable", 9, 0.25), ("explicit", 9, 0.0625),
    ("1girl", 0, 0.984375), ("long_hair", 0, 0.8125), ("smile", 0, 0.5), ("^_^", 0, 0.4375),
    ("open_mouth", 0, 0.375), ("simple_background", 0, 0.34375), ("hat_(object)", 0, 0.625),
    ("blue_eyes", 0, 0.3125), ("solo", 0, 0.9375),
    ("hatsune_miku_(vocaloid)", 4, 0.90625), ("hakurei_reimu", 4, 0.84375), ("c.c.", 4, 0.1875),
]
LABELS = Labels(tuple(r[0] for r in ROWS), np.array([r[1] for r in ROWS], dtype=np.int16))
PROBS = np.array([r[2] for r in ROWS], dtype=np.float32)
DEFAULT = "hatsune miku (vocaloid), 1girl, solo, long hair, hat (object), smile, ^_^, open mouth"


def caption(probs=PROBS, existing=None, defaults=(0.35, 0.85), **changes) -> str:
    return render_caption(probs, LABELS, dataclasses.replace(CaptionOptions(), **changes), defaults, existing)


def test_defaults():
    assert caption() == DEFAULT


def test_general_threshold_keeps_scores_equal_to_it():
    assert caption(general_threshold=0.375) == DEFAULT
    assert caption(general_threshold=0.5) == "hatsune miku (vocaloid), 1girl, solo, long hair, hat (object), smile"


def test_character_threshold():
    assert caption(character_threshold=0.84375, general_threshold=0.9) == \
        "hatsune miku (vocaloid), hakurei reimu, 1girl, solo"


def test_mcut_general():
    # general scores sorted: .984 .938 .813 | .625 ...: the largest gap (.1875) is below long_hair
    assert caption(general_mcut=True) == "hatsune miku (vocaloid), 1girl, solo, long hair"


def test_mcut_character_and_its_floor():
    # characters .906 .844 | .188 -> threshold .515625: both first two kept
    assert caption(character_mcut=True, general_threshold=0.9) == \
        "hatsune miku (vocaloid), hakurei reimu, 1girl, solo"
    low = PROBS.copy()
    low[13:16] = [0.125, 0.0625, 0.0]  # MCut alone would keep .125 (threshold .09375); the 0.15 floor drops it
    assert caption(low, character_mcut=True, general_threshold=0.9) == "1girl, solo"


def test_mcut_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scores = rng.random(int(rng.integers(2, 40)))
        ranked = sorted(scores, reverse=True)
        best = max(range(len(ranked) - 1), key=lambda i: ranked[i] - ranked[i + 1])
        assert mcut_threshold(scores) == pytest.approx((ranked[best] + ranked[best + 1]) / 2, abs=1e-12)


def test_rating_first_last_and_off():
    assert caption(rating="first") == "sensitive, " + DEFAULT
    assert caption(rating="last") == DEFAULT + ", sensitive"
    assert caption(rating="off") == DEFAULT
    assert caption(rating="first", exclude=["sensitive"]) == DEFAULT


def test_characters_last():
    assert caption(characters="last") == \
        "1girl, solo, long hair, hat (object), smile, ^_^, open mouth, hatsune miku (vocaloid)"


def test_alphabetical_sort():
    assert caption(sort="alphabetical") == \
        "hatsune miku (vocaloid), 1girl, ^_^, hat (object), long hair, open mouth, smile, solo"


def test_max_tags_keeps_highest_scores_across_categories():
    assert caption(max_tags=3) == "hatsune miku (vocaloid), 1girl, solo"
    assert caption(max_tags=2, sort="alphabetical") == "1girl, solo"


def test_underscores_and_kaomoji():
    assert caption(underscores_to_spaces=False) == \
        "hatsune_miku_(vocaloid), 1girl, solo, long_hair, hat_(object), smile, ^_^, open_mouth"
    assert caption(underscore_exceptions=[]) == DEFAULT.replace("^_^", "^ ^")


def test_escaping():
    assert caption(escape_brackets=True) == \
        r"hatsune miku \(vocaloid\), 1girl, solo, long hair, hat \(object\), smile, ^_^, open mouth"


def test_exclude_ignores_case_underscores_escaping_and_allows_regex():
    assert caption(exclude=["Long Hair", r"HAT \(OBJECT\)", "/open.*/"]) == \
        "hatsune miku (vocaloid), 1girl, solo, smile, ^_^"
    assert caption(exclude=["long_hair, smile"]) == \
        "hatsune miku (vocaloid), 1girl, solo, hat (object), ^_^, open mouth"
    assert caption(exclude=["/.*_\\(.*\\)/"]) == "1girl, solo, long hair, smile, ^_^, open mouth"


def test_include_keeps_only_matching_tags():
    assert caption(include=["1GIRL", "/.*hair/", "Hatsune Miku (Vocaloid)"]) == \
        "hatsune miku (vocaloid), 1girl, long hair"


def test_bad_regex_is_a_clear_error():
    with pytest.raises(AlchemyError, match="regular expression"):
        caption(exclude=["/([/"])


def test_trigger_tags_first_and_deduplicated():
    assert caption(trigger_tags=["my_trigger", "1girl"]) == \
        "my_trigger, 1girl, hatsune miku (vocaloid), solo, long hair, hat (object), smile, ^_^, open mouth"


def test_separator():
    assert caption(separator=",", max_tags=3) == "hatsune miku (vocaloid),1girl,solo"
    assert caption(separator=" | ", max_tags=2) == "1girl | solo"


def test_existing_caption_policies():
    old = "old tag, Long_Hair, 1girl\n"
    assert caption(existing=old, existing_caption="overwrite") == DEFAULT
    assert caption(existing=old, existing_caption="skip") == "old tag, Long_Hair, 1girl"
    assert caption(existing=old, existing_caption="append") == \
        "old tag, Long_Hair, 1girl, hatsune miku (vocaloid), solo, hat (object), smile, ^_^, open mouth"
    assert caption(existing=old, existing_caption="prepend") == DEFAULT + ", old tag"
    assert caption(existing=old, existing_caption="append", trigger_tags=["trig"]) == \
        "trig, old tag, Long_Hair, 1girl, hatsune miku (vocaloid), solo, hat (object), smile, ^_^, open mouth"
    assert caption(existing=None, existing_caption="append") == DEFAULT


def test_model_default_thresholds_apply_when_unset():
    # DeepDanbooru's customary 0.5 for both; an explicit option still wins.
    assert caption(defaults=DEEPDANBOORU_THRESHOLDS) == \
        "hatsune miku (vocaloid), hakurei reimu, 1girl, solo, long hair, hat (object), smile"
    assert caption(defaults=DEEPDANBOORU_THRESHOLDS, general_threshold=0.9, character_threshold=0.9) == \
        "hatsune miku (vocaloid), 1girl, solo"


def test_split_and_merge_helpers():
    assert split_caption(" a,  b ,,c\n") == ["a", "b", "c"]
    assert split_caption("a | b", " | ") == ["a", "b"]
    assert tag_key(r" Hat_\(Object\) ") == "hat (object)"
    opts = CaptionOptions(existing_caption="prepend")
    assert merge_caption(["x", "y"], "Y, z", opts)[0] == ["x", "y", "z"]


def test_merge_replaces_what_an_earlier_run_wrote_and_keeps_the_users_tags():
    # On disk: an earlier append run's trigger and model tags around the user's "my tag" and "Long Hair"
    # (records are compared like tags: case, "_" and spaces ignored).
    existing = "sks, my tag, Long Hair, old one, old two"
    earlier = ["sks", "old_one", "Old Two"]
    new = ["ohwx", "long hair", "new one"]
    opts = CaptionOptions(existing_caption="append", trigger_tags=["ohwx"])
    # The user already has "long hair": it stays the user's, so this run does not count it as its own
    # (a later run that no longer finds the tag leaves it in place).
    assert merge_caption(new, existing, opts, earlier) == (["ohwx", "my tag", "Long Hair", "new one"],
                                                           ["ohwx", "new one"])
    assert merge_caption(new, existing, dataclasses.replace(opts, existing_caption="prepend"), earlier) == \
        (["ohwx", "long hair", "new one", "my tag"], ["ohwx", "new one"])
    assert merge_caption(new, existing, dataclasses.replace(opts, existing_caption="overwrite"), earlier) == \
        (new, new)
    # Without a record every existing tag counts as the user's (a folder tagged elsewhere).
    assert merge_caption(new, existing, opts)[0] == ["ohwx", "sks", "my tag", "Long Hair", "old one", "old two",
                                                    "new one"]
    assert merge_caption(new, None, opts, earlier) == (new, new)


def test_selected_tags_csv_round_trip(tmp_path):
    path = write_selected_tags(tmp_path / "selected_tags.csv")
    labels = read_selected_tags(path)
    rows = tag_rows()
    assert list(labels.names) == [r[0] for r in rows]
    assert labels.categories.tolist() == [r[1] for r in rows]
    assert 'don\'t_say_"lazy"' in labels.names and "hello,_world" in labels.names


def test_selected_tags_csv_errors_name_the_file(tmp_path):
    bad = tmp_path / "selected_tags.csv"
    bad.write_text("id,tag\n1,foo\n", encoding="utf-8")
    with pytest.raises(AlchemyError) as err:
        read_selected_tags(bad)
    assert str(bad) in err.value.message
    bad.write_text("tag_id,name,category,count\n1,foo,notanumber,3\n", encoding="utf-8")
    with pytest.raises(AlchemyError, match="row 2"):
        read_selected_tags(bad)
