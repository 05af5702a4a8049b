"""``alchemy apt create|train``: DreamArtist-style pairs ``{name}`` / ``{name}-neg``.

``create`` writes both embeddings from their initialization texts (needs ``--ckpt`` for the token vectors);
``train`` trains the pair on a folder of images (Ctrl-C stops at the next step and saves; ``--resume LOG_DIR``
continues a stopped run exactly, and options given with it override the saved ones, e.g. ``--steps``).
"""
from __future__ import annotations

import argparse

from ..commands.embedding import FolderCommand, ModelCommand, load_text_encoder, train_in_session
from ..commands.method_commands import add_action
from ..options import from_cli


def register(subparsers) -> None:
    from .options import AptCreateOptions, AptTrainOptions

    parser = subparsers.add_parser("apt", help="create and train APT (DreamArtist) embedding pairs",
                                   description="Create and train a positive embedding <name> and a negative one "
                                               "<name>-neg together, with classifier-free guidance inside the loss. "
                                               "Use them with <name> in the prompt and <name>-neg in the negative "
                                               "prompt.")
    actions = parser.add_subparsers(dest="apt_action", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    add_action(actions, "create", run_create, (AptCreateOptions, ModelCommand, FolderCommand),
               help="write a new pair <name> and <name>-neg from initialization texts",
               description="Write <embeddings dir>/<name>.pt and <name>-neg.pt, their vectors taken from the token "
                           "embeddings of the initialization texts (the negative's with a little noise).")
    add_action(actions, "train", run_train, (ModelCommand, AptTrainOptions),
               help="train a pair on a folder of images",
               description="Train the pair <embedding-name> / <embedding-name>-neg of the embeddings folder on a folder "
                           "of images (masks <image>_att.png beside them weight the loss). Ctrl-C stops at the next "
                           "step and saves; --resume LOG_DIR continues exactly.")


def run_create(args: argparse.Namespace) -> int:
    from ..embeddings.create import check_name
    from .create import create_pair
    from .options import NEG_SUFFIX, AptCreateOptions

    opts = from_cli(AptCreateOptions, args)
    folder = from_cli(FolderCommand, args)
    command = from_cli(ModelCommand, args)
    check_name(opts.name)  # before the model load
    check_name(opts.name + NEG_SUFFIX)
    model = load_text_encoder(command.ckpt, command.device)
    for path in create_pair(model, opts, directory=folder.embeddings_dir):
        print(path)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from .cfg_scale import parse_cfg_scale
    from .options import AptTrainOptions
    from .session import AptSession

    return train_in_session(args, AptTrainOptions, AptSession, "apt train",
                            check=lambda options: parse_cfg_scale(options.cfg_scale))
