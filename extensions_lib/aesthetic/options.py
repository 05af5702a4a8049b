"""The options of applying and creating aesthetic embeddings, declared once (CLI, gradio, API).

Defaults and ranges are the original extension's (its txt2img/img2img accordion and create tab), plus
"leave the negative prompt alone", which the original did not have (it personalised the negative too).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..options import option
from .personalise import Settings

NONE = "None"


@dataclass
class AestheticOptions:
    embedding: str = option(NONE, help="aesthetic embedding to apply (None = off)", label="Aesthetic imgs embedding",
                            cli="--aesthetic-embedding", ui=False)
    weight: float = option(0.9, help="how much of the personalised conditioning to use (0 = off)",
                           label="Aesthetic weight", minimum=0.0, maximum=1.0, step=0.01, cli="--aesthetic-weight")
    steps: int = option(5, help="optimisation steps per prompt chunk (0 = off)", label="Aesthetic steps",
                        minimum=0, maximum=50, step=1, cli="--aesthetic-steps")
    lr: float = option(0.0001, help="Adam learning rate of the personalisation", label="Aesthetic learning rate",
                       widget="textbox", cli="--aesthetic-lr")
    slerp: bool = option(False, help="blend by spherical instead of linear interpolation", label="Slerp interpolation",
                         cli="--aesthetic-slerp")
    text: str = option("", help="text used to rotate the feature space of the images' embedding",
                       label="Aesthetic text for imgs", cli="--aesthetic-text")
    slerp_angle: float = option(0.1, help="how far to rotate towards the text", label="Slerp angle",
                                minimum=0.0, maximum=1.0, step=0.01, cli="--aesthetic-slerp-angle")
    text_negative: bool = option(False, help="rotate away from the text instead of towards it",
                                 label="Is negative text", cli="--aesthetic-text-negative")
    leave_negative: bool = option(True, help="personalise only the prompt, not the negative prompt",
                                  label="Leave the negative prompt alone", cli="--aesthetic-leave-negative")

    def settings(self) -> Settings:
        return Settings(weight=float(self.weight), steps=int(self.steps), lr=float(self.lr), slerp=bool(self.slerp),
                        text=self.text or "", slerp_angle=float(self.slerp_angle),
                        text_negative=bool(self.text_negative), leave_negative=bool(self.leave_negative))

    @property
    def enabled(self) -> bool:
        return bool(self.embedding) and self.embedding != NONE and self.settings().active

    def infotext(self, digest: str) -> dict[str, str]:
        """The original's infotext keys (so its paste-back fields work), plus ours."""
        return {"Aesthetic LR": f"{self.lr:g}", "Aesthetic weight": f"{self.weight:g}",
                "Aesthetic steps": str(self.steps), "Aesthetic embedding": self.embedding,
                "Aesthetic embedding hash": digest, "Aesthetic slerp": str(self.slerp),
                "Aesthetic text": self.text or None,
                "Aesthetic text negative": str(self.text_negative) if self.text else None,
                "Aesthetic slerp angle": f"{self.slerp_angle:g}" if self.text else None,
                "Aesthetic negative prompt": "unchanged" if self.leave_negative else "personalised"}


INFOTEXT_FIELDS = {"Aesthetic LR": "lr", "Aesthetic weight": "weight", "Aesthetic steps": "steps",
                   "Aesthetic embedding": "embedding", "Aesthetic slerp": "slerp", "Aesthetic text": "text",
                   "Aesthetic text negative": "text_negative", "Aesthetic slerp angle": "slerp_angle"}


@dataclass
class CreateOptions:
    name: str = option("", help="name of the embedding (its file name without .pt)")
    source: Optional[Path] = option(None, help="folder of images in the style (not searched recursively)",
                                    label="Source directory")
    batch_size: int = option(256, help="images encoded together", minimum=1, maximum=1024, step=1)
    clip: str = option("", help="CLIP model: a folder/file path or a folder name in the CLIP models folder; "
                                "empty = the model family's default (ViT-L/14 for SD1, ViT-H/14 for SD2)",
                       label="CLIP model")
    family: str = option("sd1", help="model family the embedding is for", choices=["sd1", "sd2"])
    download: bool = option(False, help="download the default CLIP model at its pinned revision if missing")
    overwrite: bool = option(False, help="replace an existing embedding of that name")
