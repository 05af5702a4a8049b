"""Every captioner option, declared once (CLI flags of `alchemy caption`/`interrogate`, the Captions tab,
the API's JSON)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..options import option
from ..tagger.options import EXISTING_POLICIES

MODES = ("classic", "fast", "best", "negative")
OUTPUTS = ("txt", "kohya_json", "metadata_jsonl")
PARTS = ("trigger", "tags", "sentence", "clip")


@dataclass
class BlipOptions:
    """How BLIP writes its sentence."""

    num_beams: int = option(1, help="beam search width (1 = greedy, the WebUI's default)", minimum=1, maximum=16,
                            group="BLIP")
    min_length: int = option(5, help="shortest caption in tokens (prompt included)", minimum=0, maximum=256,
                             group="BLIP")
    max_length: int = option(48, help="longest caption in tokens (prompt included; the WebUI uses 48)", minimum=1,
                             maximum=256, group="BLIP")
    repetition_penalty: float = option(1.0, help="above 1 discourages repeated words", minimum=1.0, maximum=3.0,
                                       group="BLIP")
    prompt: str = option("", help="conditional captioning: the sentence starts with this text, e.g. "
                                  "'a photograph of'", group="BLIP")
    keep_prompt: bool = option(False, help="keep the conditional prompt at the start of the sentence", group="BLIP")


@dataclass
class InterrogateOptions:
    """How the CLIP interrogator picks its terms."""

    mode: str = option("fast", help="classic: medium, artist, trending, movement and 3 flavors; fast: the top "
                                    "terms of all tables; best: greedily chain terms while CLIP similarity rises "
                                    "and keep the best of all prompts (slow: encodes many prompts); negative: a "
                                    "chain of the least similar terms", choices=list(MODES), group="CLIP")
    max_flavors: int = option(32, help="most terms fast/best/negative add", minimum=1, maximum=128, group="CLIP")
    min_flavors: int = option(8, help="best mode keeps chaining at least this many terms", minimum=0, maximum=128,
                              group="CLIP")
    intermediate_count: int = option(2048, help="best/negative modes chain over this many top candidates",
                                     minimum=1, group="CLIP")
    chunk_size: int = option(2048, help="labels ranked (and text prompts encoded) per step; lower needs less "
                                        "memory", minimum=1, group="CLIP")
    prompt_budget: int = option(75, help="CLIP tokens the interrogator prompt may use (77 minus start and end tokens)",
                               minimum=1, maximum=75, group="CLIP")


@dataclass
class ComposeOptions:
    """How the parts become one caption, and where it goes."""

    order: list = option(list(PARTS), help="the caption's parts in order: trigger (trigger words), tags (tagger), "
                                           "sentence (BLIP), clip (interrogator terms)", multiple=True,
                         widget="textbox", group="Caption")
    trigger_words: list = option([], help="words written first (e.g. the token you train); comma-separated",
                                 multiple=True, widget="textbox", group="Caption")
    token_budget: int = option(75, help="CLIP tokens the whole caption may use; tags and terms past it are "
                                        "dropped from the end (0 = no limit)", minimum=0, maximum=1000,
                               group="Caption")
    keep_first: int = option(0, help="the first N comma-separated parts that are never dropped (and that a "
                                     "trainer's keep_tokens should keep in place when shuffling); 0 = the "
                                     "trigger words and the sentence", minimum=0, group="Caption")
    separator: str = option(", ", help="text between parts", group="Caption")
    existing_caption: str = option("skip", help="when an image already has a caption: skip it (no inference, so a "
                                                "re-run resumes), overwrite it, append the new parts after it or "
                                                "prepend them (parts an earlier run wrote are replaced, yours kept)",
                                   choices=list(EXISTING_POLICIES), group="Caption")
    outputs: list = option(["txt"], help="what to write: txt (A1111 caption beside each image), kohya_json "
                                         "(meta_cap.json for kohya fine-tuning), metadata_jsonl (Hugging Face "
                                         "imagefolder metadata.jsonl)", choices=list(OUTPUTS), multiple=True,
                           group="Caption")


@dataclass
class CaptionRunOptions:
    """Which models caption which folder, and where the results go."""

    blip_model: str = option("", help="BLIP model: a transformers folder, a folder name in --models-dir, or "
                                      "blip-base / blip-large (with --download); empty = no sentence", ui=False)
    clip_model: str = option("", help="CLIP interrogator model: sd1 (ViT-L-14/openai), sd2 (ViT-H-14/"
                                      "laion2b_s32b_b79k) or an open_clip ARCH/TAG; empty = no CLIP terms", ui=False)
    clip_path: Optional[Path] = option(None, help="CLIP weights file (.pt/.bin/.safetensors) or open_clip folder "
                                                  "(open_clip_config.json + weights) instead of --models-dir/clip; "
                                                  "--clip-model then names it (e.g. ViT-L-14/openai, which also "
                                                  "picks clip-interrogator's cache files), else its file name does",
                                       ui=False)
    tagger_model: str = option("", help="tagger for the tags part (as `alchemy tag --model`); its score cache is "
                                        "shared with `alchemy tag`", ui=False)
    models_dir: Optional[Path] = option(None, help="captioner models folder [default: models/captioners]", ui=False)
    download: bool = option(False, help="fetch a known model that is missing (BLIP base is pinned to a commit; "
                                        "OpenAI CLIP is checked against its sha256)")
    labels_dir: Optional[Path] = option(None, help="folder with the interrogator's label lists (artists.txt, "
                                                   "flavors.txt, mediums.txt, movements.txt, negative.txt) "
                                                   "[default: the shipped clip-interrogator lists]", ui=False)
    labels_cache_dir: Optional[Path] = option(None, help="where the label tables' text embeddings are cached "
                                                        "[default: <cache dir>/clip-interrogator]; clip-interrogator's "
                                                        "own cache folder works as it is", ui=False)
    recursive: bool = option(False, help="also caption images in sub-folders")
    output_dir: Optional[Path] = option(None, help="write captions here, mirroring the input folders", ui=False)
    caption_extension: str = option(".txt", help="caption file extension")
    batch_size: int = option(0, help="images per model call; 0 = automatic (4 on CPU, 16 on GPU)", minimum=0)
    cache: bool = option(True, help="cache sentences, CLIP image features and prompts per image content, so a "
                                    "re-run only works on new images")
    cache_dir: Optional[Path] = option(None, help="cache folder [default: ~/.cache/alchemy]; the label "
                                                  "embeddings go to its clip-interrogator/ folder", ui=False)
    max_pixels: int = option(89_478_485, help="skip images with more pixels than this", minimum=1)
    device: str = option("auto", help="where the models run", choices=["auto", "cpu", "cuda"])
