"""Aesthetic Gradients (Gallego 2022): steer generation towards the look of an image folder.

- ``file``: the original extension's ``.pt`` (a ``[1, dim]`` tensor; its fp16 and CUDA-saved files read
  too), written so a stock WebUI loads it; the folder listing.
- ``clip_models``: the CLIP image towers (ViT-L/14 for SD1, OpenCLIP ViT-H/14 for SD2) from a local file
  or folder, or downloaded at a pinned revision into the models folder; SD1's text projection.
- ``create``: mean of normalised image features over a folder, batched, with progress.
- ``towers`` / ``personalise``: a few Adam steps on a copy of the loaded model's own text-tower weights
  towards the embedding, blended into the conditioning, cached per (prompt chunk, embedding, options,
  model).
- ``standalone``: the same inside ``alchemy txt2img``; the WebUI side is ``extensions_lib.host.aesthetic``.
"""
