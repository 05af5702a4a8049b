"""DreamBooth's objective and batches: the prior-preservation weight is really applied (checked against an
independent computation through the UNet), class images join every batch after the instance images."""
from __future__ import annotations

import json
import random

import pytest
import torch

from extensions_lib.dreambooth.concepts import Concept, concepts_from_options, read_concepts
from extensions_lib.dreambooth.data import build_dreambooth_data
from extensions_lib.dreambooth.loss import dreambooth_loss
from extensions_lib.dreambooth.options import DreamBoothTrainOptions
from extensions_lib.errors import AlchemyError
from train_fakes import make_folder


def _independent_losses(model, latents, cond, seed):
    """Per-sample MSE by the DDPM definitions, drawing t then ε from a generator seeded like the batch's."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (latents.shape[0],), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    a = model.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    noisy = (a.sqrt() * latents.double() + (1 - a).sqrt() * noise.double()).float()
    with torch.no_grad():
        pred = model.unet(noisy, t, encoder_hidden_states=cond).sample
    if model.prediction_type == "v":
        target = (a.sqrt() * noise.double() - (1 - a).sqrt() * latents.double()).float()
    else:
        target = noise
    return ((pred - target) ** 2).flatten(1).mean(1)


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
@pytest.mark.parametrize("weight", [0.0, 0.37, 1.0])
def test_prior_weight_is_applied(tiny_model, family, weight):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    cond = torch.randn(4, 77, model.context_dim, generator=g)
    with torch.no_grad():
        total, instance, prior = dreambooth_loss(model, latents, cond, 2, weight,
                                                 generator=torch.Generator().manual_seed(11))
    per = _independent_losses(model, latents, cond, 11)
    exp_inst, exp_prior = per[:2].mean(), per[2:].mean()
    assert instance == pytest.approx(float(exp_inst), rel=1e-5)
    assert prior == pytest.approx(float(exp_prior), rel=1e-5)
    assert float(total) == pytest.approx(float(exp_inst + weight * exp_prior), rel=1e-5)
    assert abs(float(exp_prior)) > 1e-3  # the weight has something to scale


def test_no_prior_samples_is_instance_loss(tiny_model):
    model = tiny_model("sd1")
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = torch.randn(3, 77, model.context_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        total, instance, prior = dreambooth_loss(model, latents, cond, 0, 1.0, generator=torch.Generator().manual_seed(3))
    assert prior is None
    assert float(total) == pytest.approx(float(_independent_losses(model, latents, cond, 3).mean()), rel=1e-5)


def test_class_images_follow_instances_in_each_batch(tmp_path, tiny_model):
    model = tiny_model("sd1")
    dog = make_folder(tmp_path / "dog", 3)
    cat = make_folder(tmp_path / "cat", 2)
    dogs = make_folder(tmp_path / "dogs", 2, captions=False)
    concepts = [Concept(str(dog), "a photo of sks dog, [filewords]", "a photo of dog", str(dogs), 2),
                Concept(str(cat), "a photo of zwx cat")]
    options = DreamBoothTrainOptions(model_name="x", training_width=64, training_height=64, seed=3, batch_size=2)
    data = build_dreambooth_data(model, options, concepts)
    assert data.image_count == 5 and data.steps_per_epoch == 3  # 3 dog images -> 2 batches, 2 cat -> 1
    seen_prior = 0
    for step in data.epoch(0):
        for key in step:
            batch = data.make_batch(key, random.Random(0), torch.Generator())
            dog_items = [k for k in key if data.index[k][0] == 0]
            assert batch.prior == len(dog_items)
            n = len(key)
            assert batch.latents.shape[0] == n + batch.prior
            assert all(p == "a photo of dog" for p in batch.prompts[n:])
            for k, p in zip(key, batch.prompts[:n]):
                c, i = data.index[k]
                assert p.startswith("a photo of sks dog, thing" if c == 0 else "a photo of zwx cat")
                assert torch.equal(batch.latents[key.index(k)], data.concepts[c].instance_latents.latents(i))
            class_cache = data.concepts[0].class_latents
            for row in batch.latents[n:]:
                assert any(torch.equal(row, class_cache.latents(j)) for j in range(2))
            seen_prior += batch.prior
    assert seen_prior >= 3  # every dog image brought a class image


def test_concepts_file_and_errors(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps([{"instance_dir": "a", "instance_prompt": "sks", "class_prompt": "dog",
                              "class_dir": "d", "num_class_images": 4}, {"instance_dir": "b", "instance_prompt": "zwx"}]))
    got = concepts_from_options(DreamBoothTrainOptions(concepts_file=str(f)))
    assert got == [Concept("a", "sks", "dog", "d", 4), Concept("b", "zwx")]
    assert got[0].with_prior and not got[1].with_prior
    f.write_text(json.dumps([{"instance_dir": "a", "instance_prompt": "sks", "colour": 1}]))
    with pytest.raises(AlchemyError, match="unknown keys"):
        read_concepts(f)
    with pytest.raises(AlchemyError, match="class images folder"):
        concepts_from_options(DreamBoothTrainOptions(data_root="x", instance_prompt="sks", class_prompt="dog"))
