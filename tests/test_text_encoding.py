"""encode_chunks picks the layer the WebUI uses, equals independent forwards, and honours embedding wrappers."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel

from extensions_lib.backend.text_encoding import encode_chunks, hidden_state_index
from extensions_lib.errors import AlchemyError

WIDTH, HEADS, LAYERS = 32, 4, 4


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, layer norms and biases included, so a skipped step cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm_weight = p.ndim == 1 and ("norm" in name or "ln" in name) and name.endswith("weight")
            p.copy_(1 + 0.2 * noise if is_norm_weight else 0.2 * noise)


def tiny_clip(act: str = "quick_gelu", seed: int = 0) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=49408, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                            num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=77,
                            hidden_act=act)
    model = CLIPTextModel(config).eval()
    randomize_(model, seed)
    return model


def chunk_tokens(*bodies: list[int], pad: int = 49407) -> torch.Tensor:
    rows = []
    for body in bodies:
        row = [49406] + body + [49407]
        rows.append(row + [pad] * (77 - len(row)))
    return torch.tensor(rows)


TOKENS = chunk_tokens([320, 1125, 539, 320, 2368], [267] * 30 + [9000, 12], list(range(1, 76)))


def reference_clip_forward(model: CLIPTextModel, embeds: torch.Tensor, n_layers: int) -> torch.Tensor:
    """Plain-torch CLIP text transformer (quick_gelu): n_layers blocks under a causal mask, then final LN."""
    p = {k.removeprefix("text_model."): v for k, v in model.named_parameters()}
    n, t, c = embeds.shape

    def lin(y, name):
        return F.linear(y, p[name + ".weight"], p[name + ".bias"])

    def norm(y, name):
        return F.layer_norm(y, (c,), p[name + ".weight"], p[name + ".bias"], model.config.layer_norm_eps)

    def heads(y):
        return y.view(n, t, HEADS, c // HEADS).transpose(1, 2)

    x = embeds + p["embeddings.position_embedding.weight"][:t]
    mask = torch.full((t, t), float("-inf")).triu(1)
    for i in range(n_layers):
        pre = f"encoder.layers.{i}."
        h = norm(x, pre + "layer_norm1")
        q, k, v = (heads(lin(h, pre + f"self_attn.{a}_proj")) for a in "qkv")
        att = torch.softmax(q @ k.transpose(-1, -2) / (c // HEADS) ** 0.5 + mask, dim=-1) @ v
        x = x + lin(att.transpose(1, 2).reshape(n, t, c), pre + "self_attn.out_proj")
        h = lin(norm(x, pre + "layer_norm2"), pre + "mlp.fc1")
        x = x + lin(h * torch.sigmoid(1.702 * h), pre + "mlp.fc2")
    return norm(x, "final_layer_norm")


@pytest.fixture(scope="module")
def sd1_model():
    return tiny_clip()


@pytest.mark.parametrize("clip_skip", [1, 2, 3, 4])
def test_sd1_equals_independent_forward(sd1_model, clip_skip):
    embeds = sd1_model.text_model.embeddings.token_embedding.weight[TOKENS]
    with torch.no_grad():
        ours = encode_chunks(sd1_model, TOKENS, "sd1", clip_skip=clip_skip)
        expected = reference_clip_forward(sd1_model, embeds, LAYERS - clip_skip + 1)
    assert ours.shape == (3, 77, WIDTH)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_layer_choice_by_family():
    assert hidden_state_index("sd1", 1, 12) is None  # last_hidden_state (already normed)
    assert hidden_state_index("sd1", 2, 12) == -2
    assert hidden_state_index("sd2", 1, 24) == -2  # penultimate
    assert hidden_state_index("sd2", 2, 24) == -3


@pytest.mark.parametrize("family, clip_skip", [("sd1", 0), ("sd1", LAYERS + 1), ("sd2", LAYERS), ("sd1", 1.5)])
def test_bad_clip_skip_is_a_clear_error(sd1_model, family, clip_skip):
    with pytest.raises(AlchemyError, match="clip_skip"):
        encode_chunks(sd1_model, TOKENS, family, clip_skip=clip_skip)


def tiny_open_clip(seed: int = 1):
    from open_clip.transformer import TextTransformer

    tower = TextTransformer(context_length=77, vocab_size=49408, width=WIDTH, heads=HEADS, layers=LAYERS,
                            output_dim=WIDTH, act_layer=torch.nn.GELU).eval()
    randomize_(tower, seed)
    return tower


def open_clip_to_clip_text_model(tower) -> CLIPTextModel:
    """Test-local conversion of OpenCLIP text weights into CLIPTextModel layout (exact GELU)."""
    model = tiny_clip(act="gelu")
    sd = {"embeddings.token_embedding.weight": tower.token_embedding.weight,
          "embeddings.position_embedding.weight": tower.positional_embedding,
          "final_layer_norm.weight": tower.ln_final.weight, "final_layer_norm.bias": tower.ln_final.bias}
    for i, block in enumerate(tower.transformer.resblocks):
        pre = f"encoder.layers.{i}."
        for a, w, b in zip("qkv", block.attn.in_proj_weight.chunk(3), block.attn.in_proj_bias.chunk(3)):
            sd[pre + f"self_attn.{a}_proj.weight"], sd[pre + f"self_attn.{a}_proj.bias"] = w, b
        pairs = {"self_attn.out_proj": block.attn.out_proj, "layer_norm1": block.ln_1, "layer_norm2": block.ln_2,
                 "mlp.fc1": block.mlp.c_fc, "mlp.fc2": block.mlp.c_proj}
        for name, mod in pairs.items():
            sd[pre + name + ".weight"], sd[pre + name + ".bias"] = mod.weight, mod.bias
    missing, unexpected = model.text_model.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=False)
    assert unexpected == [] and all("position_ids" in k for k in missing)
    return model


def ldm_open_clip_encode(tower, tokens: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """ldm FrozenOpenCLIPEmbedder.encode_with_transformer: stop layer_idx blocks early, then ln_final."""
    x = tower.token_embedding(tokens) + tower.positional_embedding
    x = x.permute(1, 0, 2)
    blocks = tower.transformer.resblocks
    for block in list(blocks)[:len(blocks) - layer_idx]:
        x = block(x, attn_mask=tower.attn_mask)
    return tower.ln_final(x.permute(1, 0, 2))


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd2_equals_open_clip_penultimate(clip_skip):
    tower = tiny_open_clip()
    model = open_clip_to_clip_text_model(tower)
    tokens = chunk_tokens([320, 1125, 539, 320, 2368], list(range(100, 175)), [], pad=0)
    with torch.no_grad():
        ours = encode_chunks(model, tokens, "sd2", clip_skip=clip_skip)
        expected = ldm_open_clip_encode(tower, tokens, layer_idx=clip_skip)
        last_layer = ldm_open_clip_encode(tower, tokens, layer_idx=0)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, last_layer, atol=1e-3)  # the layer choice is visible at this size


class SpliceRow(torch.nn.Module):
    """Stand-in for a textual-inversion wrapper: replaces the embedding of token position 1."""

    def __init__(self, inner: torch.nn.Module, vector: torch.Tensor):
        super().__init__()
        self.inner, self.vector = inner, vector

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.inner(ids)
        return torch.cat([out[:, :1], self.vector.expand(len(ids), 1, -1), out[:, 2:]], dim=1)


def test_token_embedding_wrapper_takes_effect_and_undoes(sd1_model):
    model = copy.deepcopy(sd1_model)
    embeddings = model.text_model.embeddings
    original = embeddings.token_embedding
    vector = torch.randn(WIDTH, generator=torch.Generator().manual_seed(5), requires_grad=True)
    with torch.no_grad():
        before = encode_chunks(model, TOKENS, "sd1", clip_skip=2)
    embeddings.token_embedding = SpliceRow(original, vector)
    try:
        wrapped = encode_chunks(model, TOKENS, "sd1", clip_skip=2)
        embeds = original.weight[TOKENS].clone()
        embeds[:, 1] = vector
        expected = reference_clip_forward(model, embeds, LAYERS - 1)
        torch.testing.assert_close(wrapped, expected, atol=1e-5, rtol=1e-5)
        wrapped.sum().backward()
        assert vector.grad is not None and vector.grad.abs().sum() > 0  # how TI training learns
    finally:
        embeddings.token_embedding = original
    with torch.no_grad():
        assert torch.equal(encode_chunks(model, TOKENS, "sd1", clip_skip=2), before)
