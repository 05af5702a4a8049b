"""Run the hostile corpus against every entry point that reads such files and report what happened.

    PYTHONPATH=$PWD:$PWD/tests .venv/bin/python tests/hostile/probe.py

Each (entry point, file) pair runs in a forked child (so one hang or crash is contained and its memory is
measured alone): the child resets its peak RSS (``/proc/self/clear_refs``), runs the entry point and reports
the outcome and its extra peak RSS (VmHWM minus VmRSS before). Outcomes: ``refused`` (an AlchemyError or
the reader's own skip, with its reason), ``skipped`` (listed with its reason), ``not read`` (not a regular
file, never opened), ``loaded`` (read; for odd but valid files), ``traceback`` (any other exception),
``hang`` (killed after the time limit). A code-execution payload would touch the sentinel file. ``safe_load``
(checkpoints, ``.optim`` side files) and ``load_resume_state`` read every ``.pt`` too: a valid pickle that is
no embedding still loads there, so they count as raw readers.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]

import torch  # noqa: E402  (imported before forking: import costs stay out of the measurements)

from extensions_lib.cli import main as cli_main  # noqa: E402
from extensions_lib.embeddings.library import EmbeddingLibrary  # noqa: E402
from extensions_lib.errors import AlchemyError  # noqa: E402
from extensions_lib.formats.embedding import read_embedding  # noqa: E402
from extensions_lib.hypernetworks.file import read_hypernetwork  # noqa: E402
from extensions_lib.hypernetworks.library import HypernetworkLibrary  # noqa: E402
from extensions_lib.preprocess.options import PreprocessOptions  # noqa: E402
from extensions_lib.preprocess.run import preprocess_directory  # noqa: E402
from extensions_lib.safe_pickle import safe_load  # noqa: E402
from extensions_lib.tagger.image_io import ImageSkipped, decode_image, list_images  # noqa: E402
from extensions_lib.train.dataset import scan_folder  # noqa: E402
from extensions_lib.train.resume import load_resume_state  # noqa: E402
from hostile import corpus  # noqa: E402

TIME_LIMIT_S = 60


@dataclass
class Result:
    entry: str
    file: str
    kind: str
    expect: str
    outcome: str
    reason: str
    extra_peak_mb: float


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _folder_with(path: Path, good: bytes | None = None) -> Path:
    """A fresh folder holding only a link to `path` (and a good image when `good`)."""
    folder = Path(tempfile.mkdtemp(prefix="hostile-"))
    os.symlink(path, folder / path.name)
    if good is not None:
        (folder / "good.png").write_bytes(good)
    return folder


# ---- entry points: each returns (outcome, reason) --------------------------------------------------------

def _reader(read: Callable) -> Callable[[Path], tuple[str, str]]:
    def run(path: Path) -> tuple[str, str]:
        try:
            obj = read(path)
        except AlchemyError as exc:
            return "refused", exc.message
        return "loaded", f"as {getattr(obj, 'name', type(obj).__name__)!r}"
    return run


def _library(cls) -> Callable[[Path], tuple[str, str]]:
    def run(path: Path) -> tuple[str, str]:
        library = cls(_folder_with(path))
        entries = library.entries() + [e for e in library.skipped if e not in library.entries()]
        if not entries:
            return "not read", "not a regular file: never opened"
        entry = entries[0]
        return ("skipped", entry.error) if entry.error else ("loaded", f"as {entry.name!r}")
    return run


def _cli_list(path: Path) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(["embedding", "list", "--embeddings-dir", str(_folder_with(path))])
    if code != 0 or "Traceback" in err.getvalue():
        return "traceback", f"exit {code}: {err.getvalue()[-300:]}"
    text = out.getvalue().strip()
    if not text:
        return "not read", "not a regular file: never opened"
    return ("skipped", text) if ": skipped, " in text else ("loaded", text)


def _dataset(path: Path) -> tuple[str, str]:
    dataset = scan_folder(_folder_with(path, corpus.good_image()), width=64, height=64)
    for skipped in dataset.skipped:
        if skipped.path.name == path.name:
            return "skipped", skipped.reason
    if any(e.path.name == path.name for e in dataset.entries):
        return "loaded", f"hash {dataset.content_hash[:12]}"
    return "not read", "not a regular image file: never opened"


def _preprocess(path: Path) -> tuple[str, str]:
    folder = _folder_with(path, corpus.good_image())
    summary = preprocess_directory(folder, folder.parent / (folder.name + "-out"), PreprocessOptions(width=64, height=64))
    for name, reason in summary.skipped:
        if Path(name).name == path.name:
            return "skipped", reason
    if summary.sources == 1:
        return "not read", "; ".join(summary.notes) or "not a regular image file: never opened"
    return "loaded", f"{summary.processed} processed"


def _tagger(path: Path) -> tuple[str, str]:
    listed = list_images(_folder_with(path))
    if not listed:
        return "not read", "not a regular image file: never opened"
    try:
        decode_image(listed[0])
    except ImageSkipped as exc:
        return "refused", exc.reason
    return "loaded", "decoded"


def _pickles_only(read: Callable) -> Callable[[Path], tuple[str, str]]:
    def run(path: Path) -> tuple[str, str]:
        if path.suffix != ".pt":
            return "not read", "not a .pt file"
        return read(path)
    return run


PICKLE_READERS = [("safe_load", _pickles_only(_reader(safe_load))),
                  ("load_resume_state", _pickles_only(_reader(load_resume_state)))]
ENTRY_POINTS: dict[str, list[tuple[str, Callable]]] = {
    "embedding": [("read_embedding", _reader(read_embedding)), ("EmbeddingLibrary", _library(EmbeddingLibrary)),
                  ("alchemy embedding list", _cli_list), *PICKLE_READERS],
    "hypernetwork": [("read_hypernetwork", _reader(read_hypernetwork)),
                     ("HypernetworkLibrary", _library(HypernetworkLibrary)), *PICKLE_READERS],
    "image": [("train dataset", _dataset), ("preprocess", _preprocess), ("tagger", _tagger)],
}


def _child(entry_fn: Callable, path: Path, write_fd: int) -> None:
    torch.set_num_threads(1)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    try:
        outcome, reason = entry_fn(path)
    except BaseException as exc:  # noqa: BLE001 — exactly what the probe looks for
        import traceback

        outcome, reason = "traceback", "".join(traceback.format_exception_only(type(exc), exc)).strip()[-500:]
    peak = _status_kb("VmHWM")
    os.write(write_fd, json.dumps({"outcome": outcome, "reason": str(reason)[:500],
                                   "mb": max(0, peak - before) / 1024}).encode())


def run_one(entry: str, entry_fn: Callable, path: Path, specimen: corpus.Specimen) -> Result:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        code = 0
        try:
            _child(entry_fn, path, write_fd)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    deadline = time.monotonic() + TIME_LIMIT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_fd)
            return Result(entry, specimen.name, specimen.kind, specimen.expect, "hang", "killed", 0.0)
        time.sleep(0.01)
    raw = b""
    while chunk := os.read(read_fd, 65536):
        raw += chunk
    os.close(read_fd)
    if not raw:
        return Result(entry, specimen.name, specimen.kind, specimen.expect, "traceback",
                      f"child died (status {status})", 0.0)
    data = json.loads(raw)
    return Result(entry, specimen.name, specimen.kind, specimen.expect, data["outcome"], data["reason"], data["mb"])


def probe(workdir: Path) -> tuple[list[Result], bool]:
    """(every result, whether any payload ran code)."""
    sentinel = workdir / "CODE-RAN"
    specimens = corpus.build(workdir / "corpus", sentinel)
    results = []
    for specimen in specimens:
        path = workdir / "corpus" / specimen.kind / specimen.name
        for entry, fn in ENTRY_POINTS[specimen.kind]:
            results.append(run_one(entry, fn, path, specimen))
    return results, sentinel.exists()


def summary(results: list[Result], code_ran: bool) -> list[str]:
    files = {(r.kind, r.file) for r in results}
    by_file: dict[tuple[str, str], set[str]] = {}
    for r in results:  # what the readers and listings of the file's own kind did with it
        if r.entry not in dict(PICKLE_READERS):
            by_file.setdefault((r.kind, r.file), set()).add(r.outcome)
    refused = sum(1 for outcomes in by_file.values() if "refused" in outcomes)
    skipped = sum(1 for outcomes in by_file.values() if "refused" not in outcomes and outcomes & {"skipped", "not read"})
    worst = max(results, key=lambda r: r.extra_peak_mb)
    return [f"files tried: {len(files)} ({len(results)} entry-point runs)",
            f"refused (by at least one reader): {refused}",
            f"skipped only (listed with a reason, or never opened): {skipped}",
            f"loaded (odd but valid, hostile part defused): {sum(1 for o in by_file.values() if o == {'loaded'})}",
            f"tracebacks: {sum(r.outcome == 'traceback' for r in results)}, hangs: "
            f"{sum(r.outcome == 'hang' for r in results)}, code executions: {int(code_ran)}",
            f"max extra peak RSS: {worst.extra_peak_mb:.1f} MB ({worst.entry} on {worst.file})"]


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def main(argv: list[str] | None = None) -> int:
    as_json = "--json" in (sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="alchemy-hostile-") as tmp:
        results, code_ran = probe(Path(tmp))
        if as_json:
            print(json.dumps({"code_ran": code_ran, "results": [r.__dict__ for r in results]}, ensure_ascii=True))
        else:
            for r in results:
                print(f"{r.entry:24} {_printable(r.file)[:28]:30} {r.outcome:9} {r.extra_peak_mb:7.1f} MB  "
                      f"{_printable(r.reason)[:110]}")
            print()
            print("\n".join(summary(results, code_ran)))
        shutil.rmtree(tmp, ignore_errors=True)
    bad = code_ran or any(r.outcome in ("traceback", "hang") for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
