"""What a run leaves in its log folder besides the trained files: the loss CSV, the loss plot and the
settings JSON, laid out as the WebUI does (``<log directory>/<YYYY-MM-DD>/<name>/``)."""
from __future__ import annotations

import csv
import datetime
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import atomic_path, write_text
from ..folders import check_folder
from ..names import child_path
from ..options import to_dict
from .provenance import Provenance


def log_dir_for(log_directory: str | Path, name: str, today: datetime.date | None = None) -> Path:
    """``<log_directory>/<YYYY-MM-DD>/<name>/`` as the WebUI lays out its training logs; a `name` that would
    leave that folder (``../x``, ``/abs``) is refused: previews and snapshots are named after it too."""
    today = today or datetime.date.today()
    check_folder(log_directory, "the log directory")
    return child_path(Path(log_directory) / today.strftime("%Y-%m-%d"), name, "training run name")


# ---- loss CSV and plot --------------------------------------------------------------------------------

CSV_HEADER = ["step", "epoch", "epoch_step", "loss", "learn_rate"]


def trim_csv(path: Path, last_step: int) -> None:
    """On resume, drop rows written after the resumed step (and any torn last line)."""
    if not path.is_file():
        return
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.reader(fh):
            if row == CSV_HEADER:
                continue
            try:
                if len(row) == len(CSV_HEADER) and int(row[0]) <= last_step:
                    float(row[3])
                    rows.append(row)
            except ValueError:
                continue
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")  # the line ending append_csv writes
        writer.writerow(CSV_HEADER)
        writer.writerows(rows)


def append_csv(path: Path, row: list) -> None:
    # Appending, not rewriting: a log that grows each step would cost quadratic time rewritten whole. One
    # write() per line keeps a crash from leaving more than a torn last line, which resume drops.
    new = not path.is_file()
    line = ("step,epoch,epoch_step,loss,learn_rate\n" if new else "") + ",".join(map(str, row)) + "\n"
    with open(path, "a", encoding="utf-8", newline="") as fh:
        fh.write(line)


def plot_losses(losses: Sequence[tuple[int, float]], target: Path, title: str = "",
                metadata: dict[str, str] | None = None) -> bool:
    """Write the loss curve (raw and a running mean) as PNG with `metadata` as text chunks (the run's
    provenance); False when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: no global figure state inside the host process
    ax = fig.add_subplot(1, 1, 1)
    if losses:
        steps = np.array([s for s, _ in losses])
        values = np.array([v for _, v in losses], dtype=np.float64)
        ax.plot(steps, values, lw=0.6, alpha=0.4, label="loss")
        window = max(1, min(len(values) // 10, 200))
        if window > 1:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window}")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", metadata=metadata)
    return True


def write_settings(log_dir: Path, method, options, initial_step: int) -> None:
    """``settings-<YYYY-MM-DD-HH-MM-SS>.json`` with the WebUI's extra keys beside the options, including
    those of the method (``method.settings_entries()`` where it has one, e.g. a hypernetwork's structure)."""
    now = datetime.datetime.now()
    prov: Provenance = method.provenance
    entries = getattr(method, "settings_entries", None)
    settings = {"datetime": now.strftime("%Y-%m-%d %H:%M:%S"), "model_name": prov.base_model_name,
                "model_hash": prov.base_model_hash, "num_of_dataset_images": prov.dataset_images,
                **(entries() if entries is not None else {}),
                **to_dict(options), "initial_step": initial_step, "provenance": prov.to_dict()}
    write_text(log_dir / f"settings-{now.strftime('%Y-%m-%d-%H-%M-%S')}.json", json.dumps(settings, indent=4))
