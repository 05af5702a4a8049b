"""Creating embeddings: init vectors spread as the WebUI does, device independence, names and collisions."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from extensions_lib.embeddings.create import check_name, create_embedding, init_vectors, spread_vectors
from extensions_lib.errors import AlchemyError
from extensions_lib.formats.embedding import Embedding, read_embedding, write_embedding
from extensions_lib.formats.host_pt_rules import check_host_loadable


def test_spread_vectors_repeats_or_samples_tokens_by_the_hosts_index_rule():
    tokens = torch.arange(4, dtype=torch.float32)[:, None].expand(4, 3)
    # Row i is token i * n_tokens // count: written out by hand for a few shapes.
    for n_tokens, count, expected in [(3, 5, [0, 0, 1, 1, 2]), (4, 2, [0, 2]), (4, 3, [0, 1, 2]), (1, 3, [0, 0, 0]),
                                      (4, 4, [0, 1, 2, 3])]:
        got = spread_vectors(tokens[:n_tokens], count)
        assert got[:, 0].tolist() == expected
    assert torch.equal(spread_vectors(torch.zeros(0, 3), 2), torch.zeros(2, 3))


@pytest.mark.parametrize("family, cut", [("sd1", True), ("sd2", False)])
def test_init_vectors_are_the_init_texts_token_rows(tiny_model, family, cut):
    adapter = tiny_model(family)
    weight = adapter.text_encoders[0].token_embedding.weight
    ids = adapter.tokenizer.tokenize(["red round shiny thing"])[0]
    assert len(ids) == 4
    got = init_vectors(adapter, "red round shiny thing", 2)
    # SD1 (CLIP-L tokenizer) keeps the first 2 tokens; SD2 (OpenCLIP) spreads all 4 over 2 vectors.
    rows = [ids[0], ids[1]] if cut else [ids[0], ids[2]]
    assert torch.equal(got, weight[rows].detach())
    assert torch.equal(init_vectors(adapter, "red", 3), weight[[ids[0]] * 3].detach())
    assert torch.equal(init_vectors(adapter, "", 2), torch.zeros(2, adapter.text_encoders[0].width))
    with pytest.raises(AlchemyError, match="has no tokens"):
        init_vectors(adapter, "   ", 1)
    with pytest.raises(AlchemyError, match="1 to 75"):
        init_vectors(adapter, "red", 76)


def test_create_reads_the_weight_where_it_lives_not_on_the_compute_device(tiny_model, tmp_path):
    """The WebUI's --medvram bug (#2399): text encoder on the CPU, UNet (the 'device') elsewhere."""
    adapter = tiny_model("sd1")
    offloaded = SimpleNamespace(family="sd1", tokenizer=adapter.tokenizer, text_encoders=adapter.text_encoders,
                                device=torch.device("cuda:0"), unet_device=torch.device("cuda:0"))
    path = create_embedding(offloaded, "offloaded", "red thing", 2, directory=tmp_path)
    assert torch.equal(read_embedding(path).vectors, init_vectors(adapter, "red thing", 2))


def test_created_file_is_the_hosts_layout_with_step_zero(tiny_model, tmp_path):
    adapter = tiny_model("sd1")
    path = create_embedding(adapter, "my style", "*", 3, directory=tmp_path / "emb")
    assert path == tmp_path / "emb" / "my style.pt"
    assert check_host_loadable(path) == []
    emb = read_embedding(path)
    assert emb.name == "my style" and emb.step == 0 and emb.num_vectors == 3
    assert emb.sd_checkpoint is None and emb.sd_checkpoint_name is None


@pytest.mark.parametrize("name", ["", "  ", "a/b", "..", ".hidden", "name.", " pad", "semi;colon", "CON", "nul.txt",
                                  "x" * 201, "tab\there", "new\nline", "emoji😀"])
def test_names_that_are_not_safe_file_names_are_refused(name, tmp_path):
    with pytest.raises(AlchemyError, match="embedding name"):
        check_name(name)


@pytest.mark.parametrize("name", ["style", "my style", "my-style_2.0", "Ölbild", "a"])
def test_ordinary_names_pass(name):
    assert check_name(name) == name


def test_existing_names_collide_across_formats_folders_and_case(tiny_model, tmp_path):
    adapter = tiny_model("sd1")
    emb_dir = tmp_path / "emb"
    other = write_embedding(Embedding("Taken", torch.ones(1, 32)), emb_dir / "sub" / "Taken.safetensors")
    before = other.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(AlchemyError, match="already exists") as info:
            create_embedding(adapter, "taken", "*", 1, overwrite, directory=emb_dir)
        assert info.value.path == str(other)
    assert other.read_bytes() == before and not (emb_dir / "taken.pt").exists()


def test_overwrite_replaces_only_the_same_file(tiny_model, tmp_path):
    adapter = tiny_model("sd1")
    first = create_embedding(adapter, "again", "red", 1, directory=tmp_path)
    before = first.read_bytes()
    with pytest.raises(AlchemyError, match="turn on overwrite") as info:
        create_embedding(adapter, "again", "blue", 1, directory=tmp_path)
    assert info.value.path == str(first) and first.read_bytes() == before
    second = create_embedding(adapter, "again", "blue", 1, overwrite=True, directory=tmp_path)
    assert second == first and torch.equal(read_embedding(second).vectors, init_vectors(adapter, "blue", 1))
