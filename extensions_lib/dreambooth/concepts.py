"""Concepts: what one DreamBooth run learns. Each has instance images with an instance prompt and, for
prior preservation, a class prompt with a folder of class images."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import AlchemyError


@dataclass(frozen=True)
class Concept:
    instance_dir: str
    instance_prompt: str
    class_prompt: str = ""
    class_dir: str = ""
    num_class_images: int = 0

    @property
    def with_prior(self) -> bool:
        return bool(self.class_prompt) and self.num_class_images > 0


def concepts_from_options(options) -> list[Concept]:
    """The concepts of a :class:`~.options.DreamBoothTrainOptions`: those of ``concepts_file``, or the
    single one of ``data_root``/``instance_prompt``/``class_*``."""
    if options.concepts_file:
        return read_concepts(Path(options.concepts_file))
    concept = Concept(instance_dir=options.data_root, instance_prompt=options.instance_prompt,
                      class_prompt=options.class_prompt, class_dir=options.class_dir,
                      num_class_images=options.num_class_images if options.class_prompt else 0)
    check(concept, "the options")
    return [concept]


def read_concepts(path: Path) -> list[Concept]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AlchemyError(f"cannot read the concepts file: {exc}", path,
                           fix="give a JSON list of objects with instance_dir and instance_prompt") from None
    known = {f.name for f in fields(Concept)}
    if not isinstance(raw, list) or not raw or not all(isinstance(c, dict) for c in raw):
        raise AlchemyError("the concepts file must hold a non-empty JSON list of objects", path,
                           fix='e.g. [{"instance_dir": "dog", "instance_prompt": "a photo of sks dog"}]')
    out = []
    for i, entry in enumerate(raw):
        unknown = set(entry) - known
        if unknown:
            raise AlchemyError(f"concept {i}: unknown keys {sorted(unknown)}", path, fix=f"use only {sorted(known)}")
        try:
            concept = Concept(**{k: (int(v) if k == "num_class_images" else str(v)) for k, v in entry.items()})
        except (TypeError, ValueError) as exc:
            raise AlchemyError(f"concept {i}: {exc}", path, fix="instance_dir and instance_prompt are required") from None
        check(concept, f"{path} concept {i}")
        out.append(concept)
    return out


def check(concept: Concept, where: str) -> None:
    if not concept.instance_dir or not concept.instance_prompt:
        raise AlchemyError(f"{where}: a concept needs instance images and an instance prompt",
                           fix="give --data-root (the instance images) and --instance-prompt 'a photo of sks dog'")
    if concept.with_prior and not concept.class_dir:
        raise AlchemyError(f"{where}: prior preservation needs a class images folder",
                           fix="give --class-dir (missing class images are generated into it)")
