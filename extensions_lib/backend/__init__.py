"""Model backends: the standalone one (diffusers/transformers modules loaded from WebUI-style
single-file checkpoints) and the pieces it is made of.

- ``checkpoint``: read ``.safetensors`` / ``.ckpt`` / ``.pt`` single files safely; detect the family
  (sd1 / sd2 / sd2-v) from the tensors, with a ``<ckpt>.yaml`` override.
- ``keymap``: LDM (WebUI) <-> diffusers state-dict key mapping, exact both ways.
- ``tiny``: ``make_tiny_checkpoint(path, family)`` — tiny LDM-layout checkpoints for tests and the demo.
- ``tokenizer``: CLIP BPE tokenizers built offline from the vocabulary shipped in open_clip_torch.
- ``standalone``: ``load_model(path, ...) -> StandaloneModel`` implementing ``extensions_lib.adapter.ModelAdapter``.
"""
