"""The old WebUI "Preprocess images" tab's options, declared once.

Defaults and ranges are the WebUI's (modules/textual_inversion/preprocess.py before v1.7.0); the
later-changed focal entropy weight (0.15) is used. Rendered into `alchemy preprocess` flags, the
gradio tab and the saved settings from here.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import AlchemyError
from ..options import from_dict, option, to_dict


class CaptionAction(enum.Enum):
    """What to do with `<source stem>.txt` found beside a source image."""

    IGNORE = "ignore"    # new caption only
    COPY = "copy"        # existing caption only
    PREPEND = "prepend"  # existing, then new
    APPEND = "append"    # new, then existing


class Objective(enum.Enum):
    """How the auto-sized crop ranks candidate sizes."""

    MAXIMIZE_AREA = "maximize-area"
    MINIMIZE_ERROR = "minimize-error"


@dataclass
class PreprocessOptions:
    width: int = option(512, help="output width in pixels", minimum=64, maximum=2048, step=8, group="Size")
    height: int = option(512, help="output height in pixels", minimum=64, maximum=2048, step=8, group="Size")
    existing_caption: CaptionAction = option(
        CaptionAction.IGNORE, label="Existing caption txt action",
        help="what to do with a .txt caption beside a source image (the WebUI's meanings): ignore it; copy = keep "
             "it instead of a tagger caption; prepend = it, then the new tags; append = the new tags, then it",
        group="Captions")
    keep_original_size: bool = option(False, help="also save each image at its original size", group="Modes")
    flip: bool = option(False, label="Create flipped copies",
                        help="save a mirrored copy after every output image", group="Modes")
    recursive: bool = option(False, help="also read images in sub-folders of the source (outputs stay flat)",
                             group="Modes")
    skip_flagged: bool = option(False, label="Skip flagged images",
                                help="leave out source images that `alchemy watermark` or `alchemy faces` flagged "
                                     "(their SRC/watermarks.jsonl, SRC/faces.jsonl)", group="Modes")

    split: bool = option(False, label="Split oversized images",
                         help="cut images much longer than the target into overlapping tiles", group="Split")
    split_threshold: float = option(0.5, help="split when the image's aspect ratio, relative to the target's, "
                                    "is at most this", minimum=0.0, maximum=1.0, step=0.05, group="Split")
    overlap_ratio: float = option(0.2, help="minimum overlap between neighbouring tiles, as a fraction of a tile",
                                  minimum=0.0, maximum=0.9, step=0.05, group="Split")

    focal_crop: bool = option(False, label="Auto focal point crop",
                              help="crop around the most interesting point instead of the centre", group="Focal crop")
    focal_face_weight: float = option(0.9, help="pull of detected faces (needs OpenCV; otherwise unused)",
                                      minimum=0.0, maximum=1.0, step=0.05, group="Focal crop")
    focal_entropy_weight: float = option(0.15, help="pull of the most detailed (highest-entropy) region",
                                         minimum=0.0, maximum=1.0, step=0.05, group="Focal crop")
    focal_edges_weight: float = option(0.5, help="pull of corners and edges", minimum=0.0, maximum=1.0, step=0.05,
                                       group="Focal crop")
    focal_debug: bool = option(False, label="Create debug image",
                               help="also save an annotated copy under DST/focal-debug/", group="Focal crop")

    face_crop: bool = option(False, label="Face-centred crop",
                             help="crop around the largest detected face instead of the centre (an image without "
                                  "a face gets the plain crop)",
                             group="Faces")
    face_crop_scale: float = option(2.5, help="the face-centred crop is this many times the face's size (less if "
                                              "the image is too small)", minimum=1.0, maximum=8.0, step=0.1,
                                    group="Faces")
    face_detector: str = option("yunet", help="faces for the focal and face-centred crops: yunet (photos; "
                                              "models/opencv/face_detection_yunet_2023mar.onnx, falls back to haar "
                                              "when missing), anime (drawings; models/faces/anime_face_detection), "
                                              "haar (OpenCV's bundled cascade)", choices=["yunet", "anime", "haar"],
                                group="Faces")
    face_model: str = option("", help="the face detector's model file; empty: looked up in the models folder",
                             group="Faces")

    autosize: bool = option(False, label="Auto-sized crop",
                            help="crop each image to the candidate size closest to its own aspect ratio",
                            group="Auto-sized crop")
    autosize_min_dim: int = option(384, label="Dimension lower bound", help="smallest candidate width/height",
                                   minimum=64, maximum=2048, step=8, group="Auto-sized crop")
    autosize_max_dim: int = option(768, label="Dimension upper bound", help="largest candidate width/height",
                                   minimum=64, maximum=2048, step=8, group="Auto-sized crop")
    autosize_min_area: int = option(64 * 64, label="Area lower bound", help="smallest candidate area in pixels",
                                    minimum=64 * 64, maximum=2048 * 2048, widget="number", group="Auto-sized crop")
    autosize_max_area: int = option(640 * 640, label="Area upper bound", help="largest candidate area in pixels",
                                    minimum=64 * 64, maximum=2048 * 2048, widget="number", group="Auto-sized crop")
    autosize_objective: Objective = option(Objective.MAXIMIZE_AREA, label="Resizing objective",
                                           help="prefer the largest size, or the closest aspect ratio",
                                           group="Auto-sized crop")
    autosize_threshold: float = option(0.1, label="Error threshold",
                                       help="largest accepted aspect-ratio error (0 = exact)",
                                       minimum=0.0, maximum=1.0, step=0.01, group="Auto-sized crop")

    tagger_model: str = option("", help="tagger model used to caption every output: a folder (WD14: model.onnx + "
                               "selected_tags.csv; or a DeepDanbooru folder), a folder name inside --models-dir, or "
                               "a known model name (with --download); empty: no tagger captions", group="Captions")


def validate(options: PreprocessOptions) -> PreprocessOptions:
    """Check every bound and choice (also for options built in code) and the pairs no single bound
    catches; returns `options` unchanged."""
    from_dict(PreprocessOptions, to_dict(options), source="preprocess options")
    if options.autosize_min_dim > options.autosize_max_dim:
        raise AlchemyError(f"autosize_min_dim {options.autosize_min_dim} is larger than autosize_max_dim "
                           f"{options.autosize_max_dim}", fix="swap them or lower --autosize-min-dim")
    if options.autosize_min_area > options.autosize_max_area:
        raise AlchemyError(f"autosize_min_area {options.autosize_min_area} is larger than autosize_max_area "
                           f"{options.autosize_max_area}", fix="swap them or lower --autosize-min-area")
    return options
