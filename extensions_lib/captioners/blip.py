"""BLIP captions through transformers' `BlipForConditionalGeneration` (base or large).

Loads a local transformers folder only (``local_files_only``; fetching is `models.resolve_blip`'s job).
Weights in `model.safetensors` load directly; a `pytorch_model.bin` (BLIP-base ships only that) goes
through the restricted unpickler, never a plain `torch.load`.

Batches are captioned in one `generate` call. Beam search works here with any batch size: transformers
expands the image embeddings for the beams itself. The WebUI's own BLIP (salesforce code) repeats
them first as well, which under transformers 4.30.2 gives "3 vs 9" shape errors for num_beams > 1; this
route never pre-expands (tests/test_captioners_blip.py holds the regression test).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from ..errors import AlchemyError
from .base import pick_device, quick_digest
from .options import BlipOptions


def _load_weights(folder: Path, config):
    import torch
    from transformers import BlipForConditionalGeneration

    if (folder / "model.safetensors").is_file():
        return BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    from ..safe_pickle import safe_load

    state = safe_load(folder / "pytorch_model.bin")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AlchemyError("not a state dict of tensors", folder / "pytorch_model.bin", "download the file again")
    model = BlipForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise AlchemyError(f"weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})",
                           folder, "config.json and the weights must come from the same model")
    model.tie_weights()
    return model


class BlipCaptioner:
    kind = "blip"

    def __init__(self, folder: str | os.PathLike, *, device: str = "auto", report: Callable[[str], None] | None = None):
        import torch
        from transformers import BlipConfig, BlipProcessor

        folder = Path(folder)
        self.name = folder.name
        self.device = pick_device(device)
        self.on_gpu = self.device.startswith("cuda")
        try:
            config = BlipConfig.from_pretrained(folder, local_files_only=True)
            self.processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
            model = _load_weights(folder, config)
        except (OSError, ValueError) as exc:
            raise AlchemyError(f"cannot load BLIP ({type(exc).__name__}: {exc})".replace("\n", " "), folder,
                               "the folder needs config.json, the processor files and the weights") from None
        self.dtype = torch.float16 if self.on_gpu else torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        weights = [folder / w for w in ("model.safetensors", "pytorch_model.bin") if (folder / w).is_file()]
        self.model_id = f"blip-{self.name}-{quick_digest([folder / 'config.json', *weights[:1]])}"
        if report:
            report(f"loaded BLIP {self.name} on {self.device}")

    def caption(self, images: Sequence[Image.Image], options: BlipOptions | None = None) -> list[str]:
        """One sentence per image (the conditional prompt stripped unless `keep_prompt`)."""
        import torch

        opts = options or BlipOptions()
        if not images:
            return []
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        prompt = opts.prompt.strip()
        inputs = self.processor(images=rgb, text=[prompt] * len(rgb) if prompt else None, return_tensors="pt")
        inputs = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                  for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.model.generate(**inputs, num_beams=opts.num_beams, min_length=opts.min_length,
                                      max_length=opts.max_length, repetition_penalty=opts.repetition_penalty)
        texts = [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]
        if prompt and not opts.keep_prompt:
            lead = self.processor.tokenizer.decode(self.processor.tokenizer(prompt, add_special_tokens=False)
                                                   ["input_ids"]).strip()
            texts = [t[len(lead):].strip() if t.startswith(lead) else t for t in texts]
        return texts

    def unload(self) -> None:
        import torch

        self.model = None
        if self.on_gpu:
            torch.cuda.empty_cache()


def load_blip(folder: str | os.PathLike, *, device: str = "auto", report=None) -> BlipCaptioner:
    return BlipCaptioner(folder, device=device, report=report)
