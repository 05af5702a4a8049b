"""A toy training method, complete in one module, registered by adding ``"toy_method"`` to
``extensions_lib.methods.registry.METHOD_MODULES`` (what ``test_method_registry`` does).

It "trains" by writing ``<toy folder>/<toy_name>.toy`` holding its options as JSON, so a test can tell
which options reached the job through the CLI, the API or a tab. A real method's pieces live in its
package (options, job, tab, commands); here they share one file.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from extensions_lib.methods.registry import MethodSpec
from extensions_lib.options import from_cli, option, to_dict
from extensions_lib.train.options import TrainingOptions

TOY_STEPS = 7
"""The toy's own default for the shared ``steps`` option (the other methods default to something else)."""


@dataclass
class ToyTrainOptions(TrainingOptions):
    toy_name: str = option("", help="name of the toy file to train", group="Toy")
    toy_dir: str = option("toys", label="Toys folder", ui=False, help="folder the toy file is written into")
    learn_rate: str = option("0.25", label="Learning rate", help="learning rate of the toy")
    steps: int = option(TOY_STEPS, minimum=1, help="steps of the toy")
    wiggle: float = option(0.5, minimum=0.0, maximum=1.0, help="a toy-only option", group="Toy")


@dataclass
class CreateToyOptions:
    name: str = option("", help="name of the new toy")


def _write(folder: str | Path, name: str, payload: dict) -> Path:
    path = Path(folder) / f"{name}.toy"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, sort_keys=True, default=str), encoding="utf-8")
    return path


# ---- jobs ------------------------------------------------------------------------------------------

def train_toy_file(request, job):
    from extensions_lib.jobs.training import for_context
    from extensions_lib.train.loop import TrainResult

    options = for_context(request.options, request.context)
    job.update(message="toying")
    path = _write(options.toy_dir, options.toy_name, to_dict(options))
    request.context.files_changed("toys")
    return TrainResult(step=options.steps, log_dir=Path(options.log_directory), final_path=path, resume_path=None)


def create_toy_file(request, job):
    path = _write(request.context.folder("toys"), request.options.name, {"created": True})
    request.context.files_changed("toys")
    return path


# ---- tab -------------------------------------------------------------------------------------------

class ToyLibrary:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def refresh(self) -> None:
        pass

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.toy"))


def build_train_toy(runner, context, method) -> None:
    from extensions_lib.ui.train_tab import FolderListing, TrainTabSpec, build_train_tab

    listing = FolderListing(ToyLibrary, context.folder("toys"), lambda lib: [(n, "", n) for n in lib.names()],
                            elem_id=f"alchemy_{method.train_panel}_list", empty="no toys yet")
    build_train_tab(runner, context, TrainTabSpec.of(method, listing))


# ---- commands --------------------------------------------------------------------------------------

def register(subparsers) -> None:
    from extensions_lib.commands.method_commands import add_action

    parser = subparsers.add_parser("toy", help="train toys", description="Train toy files.")
    actions = parser.add_subparsers(dest="toy_action", metavar="ACTION")
    add_action(actions, "train", run_train, (ToyTrainOptions,), help="train a toy", description="Train a toy.")


def run_train(args: argparse.Namespace) -> int:
    opts = from_cli(ToyTrainOptions, args)
    print(_write(opts.toy_dir, opts.toy_name, to_dict(opts)))
    return 0


METHOD = MethodSpec(
    key="toy", title="Toy", noun="toy",
    train_options=ToyTrainOptions, name_option="toy_name",
    folder="toys", folder_option="toy_dir",
    train_job="toy_method:train_toy_file",
    train_tab="toy_method:build_train_toy",
    cli="toy_method",
    create_options=CreateToyOptions, create_job="toy_method:create_toy_file",
)
