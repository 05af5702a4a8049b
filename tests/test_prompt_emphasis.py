"""The "Original" emphasis rescale: WebUI-exact where it is defined, never NaN/inf where a mean is 0."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from extensions_lib.adapter import TextEncoderInfo
from extensions_lib.backend.text_encoding import encode_chunks
from extensions_lib.prompt import apply_emphasis, encode_prompts


def zero_mean_rows(seed: int = 0) -> torch.Tensor:
    """(2, 77, 16) integers whose every token row sums to exactly 0 (what a bias-free LayerNorm gives)."""
    z = torch.randint(-5, 6, (2, 77, 16), generator=torch.Generator().manual_seed(seed)).float()
    z[..., -1] = -z[..., :-1].sum(-1)
    assert z.mean().item() == 0.0
    return z


def webui_original(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """The WebUI's EmphasisOriginal.after_transformers, written out."""
    original_mean = z.mean()
    z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean)


@pytest.mark.parametrize("mode", ["Original", "No norm"])
def test_unit_multipliers_return_the_input_even_at_mean_zero(mode):
    z = zero_mean_rows()
    assert torch.isnan(webui_original(z, torch.ones(2, 77))).all()  # the case the skip exists for
    out = apply_emphasis(z, torch.ones(2, 77), mode)
    assert torch.equal(out, z)


def test_normal_case_is_bit_identical_to_the_webui():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 77, 16, generator=g) + 0.3
    multipliers = torch.ones(2, 77)
    multipliers[0, 3:6], multipliers[1, 10] = 1.21, 1 / 1.1
    out = apply_emphasis(z, multipliers, "Original")
    assert torch.equal(out, webui_original(z, multipliers))
    assert not torch.allclose(out, z * multipliers.unsqueeze(-1))  # the rescale did act


def test_a_zero_mean_before_or_after_scaling_leaves_the_scaled_rows():
    multipliers = torch.ones(2, 77)
    multipliers[:, 1:4] = 1.5
    z = zero_mean_rows()
    out = apply_emphasis(z, multipliers, "Original")
    assert torch.isfinite(out).all()
    assert torch.equal(out, apply_emphasis(z, multipliers, "No norm"))

    # mean 0.25 before, exactly 0 after: the WebUI divides by zero
    z = torch.tensor([[[1.0] * 4, [-0.5] * 4]])
    doubled = torch.tensor([[1.0, 2.0]])
    assert not torch.isfinite(webui_original(z, doubled)).all()
    assert torch.equal(apply_emphasis(z, doubled, "Original"), torch.tensor([[[1.0] * 4, [-1.0] * 4]]))


def test_gradients_stay_finite_through_a_zero_mean():
    z = torch.tensor([[[1.0] * 4, [-0.5] * 4]], requires_grad=True)  # mean exactly 0 once scaled
    apply_emphasis(z, torch.tensor([[1.0, 2.0]]), "Original").square().sum().backward()
    assert torch.equal(z.grad, torch.tensor([[[2.0] * 4, [-4.0] * 4]]))  # d/dz of (z*m)^2, no rescale


def exactly_zero_mean(z: torch.Tensor) -> torch.Tensor:
    """`z` rounded to 1/64 with each row's last feature making the row sum exactly 0: the mean a bias-free
    LayerNorm gives up to rounding, made exact so the test does not hang on how a torch version rounds."""
    z = torch.round(z * 64) / 64
    z[..., -1] = -z[..., :-1].sum(-1)
    return z


class DefaultInitAdapter:
    """The text half of a ModelAdapter over a tiny CLIPTextModel left as initialised (final LayerNorm
    weight 1, bias 0), its output's mean made exactly 0."""

    family = "sd1"

    class Tokenizer:
        id_start, id_end, id_pad, comma_token = 49406, 49407, 49407, 267

        def tokenize(self, texts):
            return [[int(w) for w in text.split()] for text in texts]

    def __init__(self):
        config = CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                num_attention_heads=2, max_position_embeddings=77)
        torch.manual_seed(0)
        self.text_model = CLIPTextModel(config).eval()
        self.tokenizer = self.Tokenizer()
        self.text_encoders = [TextEncoderInfo(key="", width=16, id_pad=49407,
                                              token_embedding=self.text_model.text_model.embeddings.token_embedding)]

    def encode_token_chunks(self, tokens, clip_skip=1):
        return exactly_zero_mean(encode_chunks(self.text_model, tokens, self.family, clip_skip))


def test_zero_mean_encoder_gives_finite_conditioning():
    adapter = DefaultInitAdapter()
    tokens = torch.tensor([[49406, 1, 2, 3] + [49407] * 73])
    with torch.no_grad():
        raw = adapter.encode_token_chunks(tokens)
        assert raw.mean().item() == 0.0
        plain = encode_prompts(adapter, ["1 2 3"])
        weighted = encode_prompts(adapter, ["1 (2:1.3) 3"])
    assert torch.equal(plain, raw)
    assert torch.isfinite(weighted).all() and not torch.equal(weighted, raw)
