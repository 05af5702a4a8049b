"""The standalone app's txt2img panel applying an aesthetic embedding (the job behind the panel)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from extensions_lib.aesthetic.file import save_aesthetic
from extensions_lib.aesthetic.options import AestheticOptions
from extensions_lib.sampling.txt2img import GenerationOptions, generate_from
from extensions_lib.jobs.context import UIContext
from extensions_lib.jobs.generate import GenerateRequest, Loaders, generate_images
from extensions_lib.jobs.progress import run_job
from extensions_lib.jobs.thread_runner import ThreadJobRunner
from tests.aesthetic_fakes import make_hf_clip

pytestmark = pytest.mark.needs_gradio


def test_panel_job_applies_the_embedding_and_reuses_its_cache(tmp_path, tiny_checkpoint):
    from extensions_lib.ui.app import ModelHolder

    context = UIContext(model=ModelHolder(tiny_checkpoint("sd1"), tmp_path / "cache"), embeddings_dir=tmp_path / "emb",
                        hypernetworks_dir=tmp_path / "models" / "hypernetworks", log_root=tmp_path / "logs",
                        cache_dir=tmp_path / "cache")
    save_aesthetic(torch.randn(16, generator=torch.Generator().manual_seed(4)),
                   tmp_path / "models" / "aesthetic_embeddings" / "style.pt")
    make_hf_clip(tmp_path / "models" / "aesthetic_clip" / "clip-vit-large-patch14")
    runner, loaders = ThreadJobRunner(), Loaders(context)
    opts = GenerationOptions(prompt="a house", width=64, height=64, steps=2, seed=3)
    on = AestheticOptions(embedding="style", steps=3, lr=0.01)

    def make(aesthetic):
        p = run_job(runner, generate_images, GenerateRequest(opts, loaders, aesthetic=aesthetic), title="gen")
        assert p.state == "done", p.error
        return p.result[0]

    first, second = make(on), make(on)
    personaliser = loaders.aesthetic()[1]
    assert personaliser.optimisations == 1
    plain = generate_from(context.model(), opts)[0]
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert not np.array_equal(np.asarray(first), np.asarray(plain))
    assert "Aesthetic embedding: style" in first.info["parameters"]
    assert np.array_equal(np.asarray(make(AestheticOptions(embedding="style", weight=0.0))), np.asarray(plain))
