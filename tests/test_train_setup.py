"""The run set-up: every model weight frozen for the run (no gradient is ever computed for one), every
change undone in reverse order on success, error and interrupt; the run plan parses once and early."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from extensions_lib.errors import AlchemyError
from extensions_lib.train.plan import RunPlan, plan_run
from extensions_lib.train.setup import RunSetup
from train_fakes import make_folder


class Parts:
    """A minimal adapter: two modules, one trainable, one in training mode."""

    device = torch.device("cpu")

    def __init__(self, moves_parts: bool = False):
        self.moves_parts = moves_parts
        self.unet = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
        self.vae = nn.Linear(2, 2).requires_grad_(False)
        self.unet.train()

    def modules(self):
        return {"unet": self.unet, "vae": self.vae}


def _flags(adapter):
    return [(p.requires_grad) for m in adapter.modules().values() for p in m.parameters()] + \
           [m.training for part in adapter.modules().values() for m in part.modules()]


@pytest.mark.parametrize("ending", ["success", "error", "interrupt"])
def test_undone_in_reverse_order_whatever_ends_the_run(ending):
    adapter, undone = Parts(), []
    before = _flags(adapter)
    exc = {"success": None, "error": AlchemyError("boom"), "interrupt": KeyboardInterrupt()}[ending]
    with pytest.raises(type(exc)) if exc is not None else _no_raise():
        with RunSetup(adapter) as setup:
            assert not any(p.requires_grad for p in adapter.unet.parameters())
            assert not adapter.unet.training and not adapter.unet[1].training
            setup.undo_with(lambda: undone.append("patch"))
            setup.move_away(_Away(undone))
            setup.undo_with(lambda: undone.append("last"))
            if exc is not None:
                raise exc
    assert undone == ["away", "last", "back", "patch"]
    assert _flags(adapter) == before


class _Away:
    def __init__(self, log):
        self.log = log

    def move_away(self):
        self.log.append("away")

    def put_back(self):
        self.log.append("back")


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_parts_are_moved_only_when_the_adapter_does_not_move_them_itself():
    assert RunSetup(Parts()).may_move_parts
    assert not RunSetup(Parts(moves_parts=True)).may_move_parts


def test_plan_parses_once_and_resolves_the_seed(tmp_path):
    from extensions_lib.train.options import TrainingOptions

    plan = plan_run(TrainingOptions(learn_rate="0.1:3, 0.01:5", steps=10, seed=-1, clip_grad_mode="norm",
                                    clip_grad_value="1.0"))
    assert plan.options.seed >= 0 and plan_run(plan) is plan
    assert plan.learn_rate.entries == ((0.1, 3), (0.01, 5)) and plan.stop_at == 5
    assert plan.clip.entries == ((1.0, 10),)
    with pytest.raises(AlchemyError, match="learn_rate"):
        plan_run(TrainingOptions(learn_rate="fast"))
    with pytest.raises(AlchemyError, match="clip_grad_mode"):
        plan_run(TrainingOptions(clip_grad_mode="sometimes"))
    with pytest.raises(ValueError, match="resolve_seed"):
        RunPlan.of(TrainingOptions(seed=-1))


# ---- no model weight gets a gradient, in either backend, for either method ----------------------------

def _standalone(tiny_checkpoint, tmp_path):
    from contextlib import nullcontext

    from extensions_lib.backend.standalone import load_model

    adapter = load_model(tiny_checkpoint("sd1"))
    # The standalone backend loads everything frozen; make the UNet trainable as the WebUI leaves it, so
    # the test shows that the run set-up (not the loader) keeps gradients off.
    adapter.modules()["unet"].requires_grad_(True)
    return nullcontext(adapter)


def _standin(tiny_checkpoint, tmp_path, medvram: bool = False):
    import contextlib

    from extensions_lib.host.webui_adapter import WebUIModelAdapter
    from webui_standin.harness import standin_host

    @contextlib.contextmanager
    def host_adapter():
        with standin_host(tmp_path / "webui", medvram=medvram) as host:
            model = host.load_model(tiny_checkpoint("sd1"))
            yield WebUIModelAdapter(model, host.devices.device)

    return host_adapter()


def _standin_medvram(tiny_checkpoint, tmp_path):
    """The host parks parts itself (and swaps their parameter objects while doing so)."""
    return _standin(tiny_checkpoint, tmp_path, medvram=True)


def _train_embedding(adapter, tmp_path, callback):
    from extensions_lib.embeddings.create import create_embedding
    from extensions_lib.embeddings.options import EmbeddingTrainOptions
    from extensions_lib.embeddings.session import train_embedding
    from extensions_lib.formats.embedding import read_embedding

    (tmp_path / "template.txt").write_text("a photo of [name]\n", encoding="utf-8")
    start = read_embedding(create_embedding(adapter, "gradtest", "photo", 2, directory=tmp_path / "emb")).vectors
    options = EmbeddingTrainOptions(embedding_name="gradtest", embeddings_dir=str(tmp_path / "emb"),
                                    data_root=str(tmp_path / "data"), template_file=str(tmp_path / "template.txt"),
                                    training_width=64, training_height=64, steps=2, seed=3, learn_rate="0.05",
                                    save_every=0, create_image_every=0, write_csv_every=0,
                                    log_directory=str(tmp_path / "logs"))
    result = train_embedding(adapter, options, callbacks=callback)
    return not torch.equal(read_embedding(result.final_path).vectors, start)


def _train_hypernetwork(adapter, tmp_path, callback):
    from extensions_lib.hypernetworks.file import read_hypernetwork, write_hypernetwork
    from extensions_lib.hypernetworks.method import train_hypernetwork
    from extensions_lib.hypernetworks.module import Architecture, Hypernetwork
    from extensions_lib.hypernetworks.train_options import HypernetworkTrainOptions

    torch.manual_seed(0)
    path = tmp_path / "hn" / "gradnet.pt"
    write_hypernetwork(Hypernetwork.create("gradnet", [32, 64], Architecture(layer_structure=[1, 2, 1])), path)
    start = [p.detach().clone() for p in read_hypernetwork(path).parameters()]
    options = HypernetworkTrainOptions(hypernetwork_name="gradnet", hypernetwork_dir=str(tmp_path / "hn"),
                                       data_root=str(tmp_path / "data"), template_file="filewords",
                                       training_width=64, training_height=64, steps=2, seed=3, learn_rate="1e-3",
                                       save_every=0, create_image_every=0, write_csv_every=0,
                                       log_directory=str(tmp_path / "logs"))
    result = train_hypernetwork(adapter, options, callbacks=callback)
    after = read_hypernetwork(result.final_path).parameters()
    return any(not torch.equal(a, b) for a, b in zip(start, after))


HN_MEDVRAM = pytest.mark.xfail(strict=True, raises=NotImplementedError, reason=(
    "known, older than the run set-up: under the stand-in's --medvram the host parks the hypernetwork's layers "
    "(attached inside the UNet) as meta tensors with the UNet, and the patch's .to() then fails"))


@pytest.mark.parametrize("host, train", [
    (_standalone, _train_embedding), (_standalone, _train_hypernetwork),
    (_standin, _train_embedding), (_standin, _train_hypernetwork),
    (_standin_medvram, _train_embedding), pytest.param(_standin_medvram, _train_hypernetwork, marks=HN_MEDVRAM),
], ids=["standalone-embedding", "standalone-hypernetwork", "standin-embedding", "standin-hypernetwork",
        "standin-medvram-embedding", "standin-medvram-hypernetwork"])
def test_no_model_weight_gets_a_gradient_while_training(host, train, tiny_checkpoint, tmp_path):
    make_folder(tmp_path / "data", n=2, size=(64, 64))
    with host(tiny_checkpoint, tmp_path) as adapter:
        def params():  # looked up each time: a host parking parts may swap the parameter objects
            return {f"{part}.{name}": p for part, module in adapter.modules().items()
                    for name, p in module.named_parameters()}

        flags = {name: p.requires_grad for name, p in params().items()}
        assert any(name.startswith("unet.") and flag for name, flag in flags.items())  # as the WebUI leaves it
        checked = []

        def after_step(progress):
            if progress.loss is None:
                return
            checked.append(progress.step)
            with_grad = [name for name, p in params().items() if p.grad is not None or p.requires_grad]
            assert with_grad == [], f"model weights with a gradient during training: {with_grad[:5]}"

        assert train(adapter, tmp_path, after_step)  # what the method trains did move
        assert sorted(set(checked)) == [1, 2]  # (the last step is reported again when the run ends)
        assert {name: p.requires_grad for name, p in params().items()} == flags  # restored exactly
        assert all(p.grad is None for p in params().values())
