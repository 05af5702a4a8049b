"""`alchemy tags list|add|remove|replace|undo|redo|history DIR`: the tag editor from the shell."""
from __future__ import annotations

import argparse

from ..options import add_cli_arguments, from_cli


def register(subparsers) -> None:
    from ..tag_editor.options import TagDatasetOptions, TagEditOptions, TagListOptions, TagSelectOptions

    parser = subparsers.add_parser(
        "tags", help="list, add, remove or replace caption tags across a dataset (with undo)",
        description="Edit the comma-separated tags of every caption (.txt beside each image) in DIR. Each edit "
                    "saves atomically after copying the captions it changes to DIR/.alchemy-tags/snapshots/, and "
                    "is journaled so `alchemy tags undo DIR` puts it back (also edits made in the tab). An edit exits "
                    "with 3 when it left some captions as they were (edited elsewhere, or it would empty them).")
    sub = parser.add_subparsers(dest="tags_command", metavar="ACTION", required=True)

    def action(name: str, help_text: str, *, select: bool = True, edit: bool = True, skip=()):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("dir", metavar="DIR", help="dataset folder (images with their caption files)")
        add_cli_arguments(p, TagDatasetOptions)
        if select:
            add_cli_arguments(p, TagSelectOptions)
            p.add_argument("--image", action="append", default=None, metavar="NAME",
                           help="edit only this image (path relative to DIR, as `tags list --images` shows); "
                                "repeatable")
        if edit:
            add_cli_arguments(p, TagEditOptions, skip=skip)
            p.add_argument("--dry-run", action="store_true", help="show the changes without writing them")
        p.set_defaults(func=run_tags)
        return p

    p = action("list", "count the tags of the (filtered) captions", edit=False)
    add_cli_arguments(p, TagListOptions)
    p.add_argument("--images", action="store_true", help="list the matching images with their captions instead")
    p = action("add", "add tags to the matching captions", skip=("regex", "scope"))
    p.add_argument("tags", nargs="+", metavar="TAG", help="tags to add (comma-separated or separate arguments)")
    p = action("remove", "remove tags from the matching captions", skip=("regex", "scope", "position"))
    p.add_argument("tags", nargs="+", metavar="TAG", help="tags to remove")
    p = action("replace", "replace a tag (or a regex with --regex) in the matching captions", skip=("position",))
    p.add_argument("find", metavar="FIND", help="the tag to replace (a regex with --regex)")
    p.add_argument("replacement", metavar="REPLACEMENT", help="what it becomes ('' removes it; commas make "
                                                              "several tags)")
    action("undo", "undo the last edit (from the journal in DIR/.alchemy-tags)", select=False, edit=False)
    action("redo", "redo the last undone edit", select=False, edit=False)
    action("history", "list the journaled edits", select=False, edit=False)


def _editor(args):
    from ..tag_editor import TagEditor
    from ..tag_editor.options import TagDatasetOptions, TagEditOptions

    dataset = from_cli(TagDatasetOptions, args)
    separator = from_cli(TagEditOptions, args).separator if hasattr(args, "separator") else ", "
    return TagEditor(args.dir, recursive=dataset.recursive, extension=dataset.caption_extension,
                     separator=separator)


def _print_result(result) -> None:
    if result is None:
        print("nothing to do")
        return
    print(result.summary())
    for key, reason in result.skipped:
        print(f"  skipped {key}: {reason}")
    if result.snapshot is not None:
        print(f"  previous captions saved in {result.snapshot}")


def run_tags(args: argparse.Namespace) -> int:
    from ..tag_editor import Edit
    from ..tag_editor.options import TagEditOptions, TagListOptions, TagSelectOptions

    editor = _editor(args)
    for path, reason in editor.skipped:
        print(f"alchemy: skipped {path}: {reason}")
    command = args.tags_command
    if command in ("undo", "redo"):
        _print_result(editor.undo() if command == "undo" else editor.redo())
        return 0
    if command == "history":
        labels, position = editor.history()
        for i, label in enumerate(labels):
            print(f"{'*' if i < position else ' '} {i + 1}. {label}")
        return 0
    select = from_cli(TagSelectOptions, args)
    keys = editor.select(select.tag_filter(), args.image)
    if command == "list":
        if args.images:
            for key in keys:
                print(f"{key}\t{editor.entries[key].text}")
            return 0
        listing = from_cli(TagListOptions, args)
        token_count = None
        if listing.sort == "tokens":  # then a column of its own too
            from ..tag_editor.stats import clip_token_counter

            token_count = clip_token_counter()
        counts = editor.counts(keys)
        for tag, count in listing.rows(counts, token_count):
            print(f"{count}\t{token_count(tag)}\t{tag}" if token_count else f"{count}\t{tag}")
        print(f"{len(counts)} tags in {len(keys)} of {len(editor.entries)} captions")
        return 0
    opts = from_cli(TagEditOptions, args)
    if command == "replace":
        edit = Edit("replace", find=args.find, replacement=args.replacement, regex=opts.regex, scope=opts.scope)
    else:
        edit = Edit(command, tags=tuple(args.tags), position=opts.position)
    if args.dry_run:
        changes = editor.preview(edit, keys)
        for change in changes:
            print(f"{change.key}\n  - {change.before}\n  + {change.after}")
        print(f"{edit.describe()}: would change {len(changes)} of {len(keys)} matching captions (dry run)")
        return 0
    result = editor.apply(edit, keys, allow_empty=opts.allow_empty)
    _print_result(result)
    return 0 if not result.skipped else 3
