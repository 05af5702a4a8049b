"""Our embeddings and the hypernetwork toggle inside the (stand-in) WebUI's own generation path."""
from __future__ import annotations

import pytest
import torch

from extensions_lib.formats.embedding import Embedding, write_embedding
from extensions_lib.hypernetworks.file import read_hypernetwork, write_hypernetwork
from extensions_lib.hypernetworks.module import Architecture, Hypernetwork
from extensions_lib.hypernetworks.patch import apply_hypernetworks
from extensions_lib.prompt import encode_prompts
from webui_standin.harness import standin_host

PROMPT = "a photo of a cat"


def same(a, b):
    """Equal up to CPU-kernel noise between two model instances (see test_webui_adapter.same)."""
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def make_hypernetwork(folder, name="hnet", seed=0):
    torch.manual_seed(seed)
    hn = Hypernetwork.create(name, [32, 64], Architecture(layer_structure=[1, 2, 1], activation_func="relu"))
    with torch.no_grad():  # larger than the host's N(0, 0.01) start, so the effect is far above float noise
        for p in hn.parameters():
            p.mul_(20)
    path = folder / f"{name}.pt"
    write_hypernetwork(hn, path)
    return path


def load_extension(host):
    host.load_scripts()
    module = next(m for _cls, path, m in host.scripts.scripts_data if path.endswith("alchemy.py"))
    return module._extension


def run_txt2img(host, sd_model, prompt=PROMPT):
    """The host's pipeline up to sampling; returns (p, one UNet output on fixed inputs)."""
    p = host.processing.StableDiffusionProcessingTxt2Img(sd_model, prompt=prompt)
    p.scripts = host.processing.always_on_scripts()
    host.processing.prepare(p)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        return p, sd_model.apply_model(x, torch.tensor([400]), p.c)


def reference_output(ref, hn_path=None, strength=1.0, prompt=PROMPT):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    patch = apply_hypernetworks([(read_hypernetwork(hn_path), strength)], ref.attention_modules()) if hn_path else None
    try:
        with torch.no_grad():
            return ref.predict(x, torch.tensor([400]), encode_prompts(ref, [prompt]))
    finally:
        if patch is not None:
            patch.unpatch()


def test_toggle_goes_through_the_hosts_hypernetworks_and_infotext(tmp_path, tiny_checkpoint, tiny_model):
    ref = tiny_model("sd1")
    with standin_host(tmp_path) as host:
        hn_path = make_hypernetwork(tmp_path / "ours")  # our folder, not the host's --hypernetwork-dir
        host.shared.opts.data.update(alchemy_hypernetworks_dir=str(tmp_path / "ours"))
        extension = load_extension(host)
        model = host.load_model(tiny_checkpoint("sd1"))
        _p, baseline = run_txt2img(host, model)
        same(baseline, reference_output(ref))

        host.shared.opts.data.update(alchemy_hypernetwork="hnet", alchemy_hypernetwork_strength=0.5)
        p, out = run_txt2img(host, model)
        assert [(h.name, h.loaded.layers[32][0].multiplier) for h in host.shared.loaded_hypernetworks] == [("hnet", 0.5)]
        assert host.shared.hypernetworks["hnet"] == str(hn_path)  # published for the host to find
        same(out, reference_output(ref, hn_path, 0.5))
        assert not torch.allclose(out, baseline, atol=1e-4)
        assert not extension.hypernetworks.patched  # the host applied it: nothing of ours on the model
        infotext = host.processing.finish(p)
        assert "Hypernet: hnet" in infotext and "Hypernet strength: 0.5" in infotext
        assert f"Hypernet hash: {extension.hypernetworks.file_hash(hn_path)}" in infotext

        host.shared.opts.data.update(alchemy_hypernetwork="None")
        p, out = run_txt2img(host, model)
        assert host.shared.loaded_hypernetworks == [] and torch.equal(out, baseline)
        assert "Hypernet" not in host.processing.finish(p)


def test_toggle_uses_our_patch_where_the_host_has_no_hypernet_network(tmp_path, tiny_checkpoint, tiny_model):
    ref = tiny_model("sd1")
    with standin_host(tmp_path) as host:
        hn_path = make_hypernetwork(tmp_path / "ours")
        host.shared.opts.data.update(alchemy_hypernetworks_dir=str(tmp_path / "ours"), alchemy_hypernetwork="None",
                                     alchemy_hypernetwork_strength=0.7)
        host.extra_networks.extra_network_registry.pop("hypernet")  # an older/other host
        extension = load_extension(host)
        assert not extension.hypernetworks.host_path
        first = host.load_model(tiny_checkpoint("sd1"))
        second = host.load_model(tiny_checkpoint("sd1"))
        cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(9))
        plain, plain_first = _unet_out(second, cond), _unet_out(first, cond)  # bit-identity: per instance

        host.shared.opts.data.update(alchemy_hypernetwork="hnet")
        p, out = run_txt2img(host, second)
        assert extension.hypernetworks.patched
        same(out, reference_output(ref, hn_path, 0.7))
        assert "Hypernet: hnet" in host.processing.finish(p)

        host.sd_models.switch_to_cached(first)  # RAM-cache switch: no callback; the next generation notices
        _p, out_first = run_txt2img(host, first)
        same(out_first, out)
        assert torch.equal(_unet_out(second, cond), plain)  # the patch left the other model, bit for bit
        assert not torch.allclose(_unet_out(first, cond), plain_first, atol=1e-4)

        third = host.load_model(tiny_checkpoint("sd1"))  # on_model_loaded: the patch moves at once
        assert extension.hypernetworks.patched and torch.equal(_unet_out(first, cond), plain_first)
        same(_unet_out(third, cond), _unet_out_patched(ref, hn_path, cond))

        host.script_callbacks.script_unloaded_callback()
        assert not extension.hypernetworks.patched
        same(_unet_out(third, cond), plain)


def _unet_out_patched(ref, hn_path, cond):
    g = torch.Generator().manual_seed(3)
    with apply_hypernetworks([(read_hypernetwork(hn_path), 0.7)], ref.attention_modules()), torch.no_grad():
        return ref.predict(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400]), cond)


def _unet_out(model, cond):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return model.apply_model(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400]), cond)


def test_embeddings_reach_prompts_through_the_host_database_once(tmp_path, tiny_checkpoint, tiny_model):
    from extensions_lib.embeddings.matcher import EmbeddingMatcher
    from extensions_lib.embeddings.patch import patch_text_encoders

    ref = tiny_model("sd1")
    ours = tmp_path / "ours"
    emb = Embedding("zqxstyle", torch.randn(2, 32, generator=torch.Generator().manual_seed(5)))
    write_embedding(emb, ours / "zqxstyle.pt")
    prompt = "a zqxstyle cat"
    with standin_host(tmp_path) as host:
        host.shared.opts.data.update(alchemy_embeddings_dir=str(ours))
        extension = load_extension(host)
        model = host.load_model(tiny_checkpoint("sd1"))
        token_embedding = model.cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding
        # Nothing of ours around the text encoder: the host's EmbeddingsWithFixes holds the bare nn.Embedding.
        assert type(token_embedding).__module__ == "modules.sd_hijack" and type(token_embedding.wrapped) is torch.nn.Embedding
        p, _ = run_txt2img(host, model, prompt)
        with patch_text_encoders(ref), torch.no_grad():
            expected = encode_prompts(ref, [prompt], matcher=EmbeddingMatcher(ref.tokenizer, [emb]))
        same(p.c, expected)  # the host's own splice, at the right offsets
        assert p.extra_generation_params["TI hashes"].startswith("zqxstyle: ")

        # Rewriting a file in place: the host alone would keep the stale vectors; our files_changed reloads.
        emb2 = Embedding("zqxstyle", emb.vectors * -3)
        write_embedding(emb2, ours / "zqxstyle.pt")
        extension.files_changed("embeddings")
        db = host.sd_hijack.model_hijack.embedding_db
        assert torch.equal(db.word_embeddings["zqxstyle"].vec, emb2.vectors)
        listed = {e["name"]: e for e in extension.list_embeddings()}
        assert listed["zqxstyle"]["usable"] and listed["zqxstyle"]["vectors"] == 2


def test_unusable_embeddings_are_listed_with_a_reason(tmp_path, tiny_checkpoint):
    ours = tmp_path / "ours"
    write_embedding(Embedding("wide", torch.randn(1, 768)), ours / "wide.pt")
    (ours / "broken.pt").write_bytes(b"not a torch file")
    with standin_host(tmp_path) as host:
        host.shared.opts.data.update(alchemy_embeddings_dir=str(ours))
        extension = load_extension(host)
        host.load_model(tiny_checkpoint("sd1"))
        listed = {e["name"]: e for e in extension.list_embeddings()}
        assert not listed["wide"]["usable"] and "width" in listed["wide"]["reason"]
        assert not listed["broken"]["usable"] and listed["broken"]["reason"]


def test_a_toggle_naming_a_missing_file_is_reported_and_the_generation_goes_on(tmp_path, tiny_checkpoint):
    with standin_host(tmp_path) as host:
        host.shared.opts.data.update(alchemy_hypernetwork="vanished")
        load_extension(host)
        model = host.load_model(tiny_checkpoint("sd1"))
        p, out = run_txt2img(host, model)
        assert torch.isfinite(out).all() and host.shared.loaded_hypernetworks == []
        assert any("Settings > Alchemy (vanished)" in report for report in host.errors.reported)


def _train_hn(extension, name, data):
    from extensions_lib.hypernetworks.train_options import HypernetworkTrainOptions
    from extensions_lib.jobs.training import TrainRequest, train_hypernetwork_file

    options = HypernetworkTrainOptions(hypernetwork_name=name, data_root=str(data), training_width=64,
                                       training_height=64, steps=2, learn_rate="1e-3", save_every=0,
                                       create_image_every=0, seed=7, template_file="filewords", write_csv_every=0)
    runner = extension.runner
    p = runner.wait(runner.start(train_hypernetwork_file, TrainRequest(options, extension.context()),
                                 title=f"Training {name}", panel="train_hypernetwork"), 300)
    assert p.state == "done", p.error
    return [loss for _step, loss in p.loss_points]


@pytest.mark.parametrize("host_path", [True, False], ids=["host-hypernet", "our-patch"])
def test_training_inside_the_host_runs_without_the_toggles_hypernetwork(tmp_path, tiny_checkpoint, tiny_model,
                                                                       host_path):
    """The toggle's network, loaded by the last generation, must not act inside a training run (the WebUI's own
    hypernetwork training empties shared.loaded_hypernetworks too), and after the run the next generation
    uses the file as trained, not the object loaded before."""
    from train_fakes import make_folder

    ref = tiny_model("sd1")
    ours = tmp_path / "ours"
    with standin_host(tmp_path) as host:
        hn_path = make_hypernetwork(ours, "hnet")
        make_hypernetwork(ours, "twin")  # the same weights under another name
        host.shared.opts.data.update(alchemy_hypernetworks_dir=str(ours), alchemy_hypernetwork_strength=1.0)
        if not host_path:
            host.extra_networks.extra_network_registry.pop("hypernet")
        extension = load_extension(host)
        assert extension.hypernetworks.host_path is host_path
        model = host.load_model(tiny_checkpoint("sd1"))
        data = make_folder(tmp_path / "data", n=2, size=(64, 64))
        clean = _train_hn(extension, "twin", data)  # nothing else on the model

        before = tmp_path / "hnet-before.pt"
        before.write_bytes(hn_path.read_bytes())
        host.shared.opts.data.update(alchemy_hypernetwork="hnet")
        run_txt2img(host, model)  # the toggle's network is now on the model (host list or our patch)
        assert extension.hypernetworks.patched != host_path and bool(host.shared.loaded_hypernetworks) == host_path
        assert _train_hn(extension, "hnet", data) == pytest.approx(clean, rel=1e-6)
        assert host.shared.loaded_hypernetworks == [] and not extension.hypernetworks.patched

        _p, out = run_txt2img(host, model)
        same(out, reference_output(ref, hn_path, 1.0))  # read from the trained file
        assert not torch.allclose(out, reference_output(ref, before, 1.0), rtol=0, atol=1e-5)
