"""The hostile corpus (tests/hostile/corpus.py, generated in code) against every entry point that reads such
files: no code runs, nothing crashes or hangs, every hostile file is refused or skipped with its reason,
and no file costs more than a bounded amount of extra memory (measured per file in a forked child)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PICKLE_ONLY = {"safe_load", "load_resume_state"}  # readers of any .pt, not of one kind of file
MAX_EXTRA_PEAK_MB = 150  # the bombs cost 200 MB to several GB when read naively
RAW_READERS = {"read_embedding", "safe_load"}  # read one file; listings decide if it is usable (NaN vectors)


@pytest.fixture(scope="module")
def probe():
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "hostile" / "probe.py"), "--json"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.stdout, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_no_payload_runs_code(probe):
    assert probe["code_ran"] is False
    assert any("refused to load: the file asks to run" in r["reason"] for r in probe["results"])


def test_nothing_crashes_or_hangs(probe):
    bad = [r for r in probe["results"] if r["outcome"] in ("traceback", "hang")]
    assert not bad, bad


def test_every_hostile_file_is_refused_or_skipped_with_its_reason(probe):
    for r in probe["results"]:
        if r["expect"] == "refuse" and r["entry"] not in RAW_READERS:
            assert r["outcome"] in ("refused", "skipped", "not read"), r
            assert r["reason"].strip(), r
    by_file = {}
    for r in probe["results"]:
        by_file.setdefault((r["kind"], r["file"]), []).append(r)
    assert len(by_file) >= 40
    for runs in by_file.values():
        if runs[0]["expect"] == "refuse":
            assert any(r["outcome"] != "loaded" for r in runs), runs


def test_odd_but_valid_files_load_with_the_hostile_part_defused(probe):
    loads = [r for r in probe["results"] if r["expect"] == "load" and r["entry"] not in PICKLE_ONLY]
    assert loads and all(r["outcome"] == "loaded" for r in loads), loads
    assert all("escape_name" in r["reason"] for r in loads if r["file"] == "escape_name.png")


def test_peak_memory_per_file_is_bounded(probe):
    worst = max(probe["results"], key=lambda r: r["extra_peak_mb"])
    assert worst["extra_peak_mb"] < MAX_EXTRA_PEAK_MB, worst
