"""Training jobs inside the (stand-in) WebUI: through its GPU queue and shared.state, one at a time,
stopped by its Interrupt button or a model switch, with everything saved."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from extensions_lib.host.jobs import Busy
from train_fakes import make_folder
from webui_standin.harness import standin_host


def _extension(host):
    host.load_scripts()
    module = next(m for _cls, path, m in host.scripts.scripts_data if path.endswith("alchemy.py"))
    return module._extension


def _hypernetwork(host, name="hnet"):
    from extensions_lib.hypernetworks.file import write_hypernetwork
    from extensions_lib.hypernetworks.module import Architecture, Hypernetwork

    torch.manual_seed(0)
    hn = Hypernetwork.create(name, [32, 64], Architecture(layer_structure=[1, 2, 1], activation_func="relu"))
    write_hypernetwork(hn, host.data_dir / "models" / "hypernetworks" / f"{name}.pt")


def _request(extension, data_root, **changes):
    from extensions_lib.hypernetworks.train_options import HypernetworkTrainOptions
    from extensions_lib.jobs.training import TrainRequest

    values = dict(hypernetwork_name="hnet", data_root=str(data_root), training_width=64, training_height=64,
                  steps=4, learn_rate="1e-3", save_every=2, create_image_every=3, preview_steps=2, seed=7,
                  template_file="filewords", write_csv_every=1)
    values.update(changes)
    return TrainRequest(options=HypernetworkTrainOptions(**values), context=extension.context())


@pytest.fixture
def webui(tmp_path, tiny_checkpoint):
    with standin_host(tmp_path) as host:
        extension = _extension(host)
        host.load_model(tiny_checkpoint("sd1"))
        _hypernetwork(host)
        data = make_folder(tmp_path / "data", n=2, size=(64, 64))
        yield host, extension, data


def _watch(host, task, until):
    """Sample the host's progress endpoint and state from another thread until `until()`."""
    seen = []

    def sample():
        while not until():
            seen.append((host.progress.progressapi(task), host.shared.state.job_no, host.shared.state.job_count,
                         host.shared.state.textinfo, host.shared.state.id_live_preview))
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return seen, thread


def _wait_for(predicate, timeout=120.0):
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


def test_training_runs_in_the_host_queue_and_reports_through_shared_state(webui):
    from extensions_lib.jobs.training import train_hypernetwork_file

    host, extension, data = webui
    runner = extension.runner
    job_id = runner.start(train_hypernetwork_file, _request(extension, data), title="Training hnet",
                          panel="train_hypernetwork")
    seen, sampler = _watch(host, f"task({job_id})", lambda: not runner.progress().active
                           and runner.progress().state != "queued")
    p = runner.wait(job_id, 300)
    sampler.join(5)
    assert p.state == "done", p.error
    result = p.result
    assert result.step == 4 and result.final_path.is_file()
    assert [s for s, _ in p.loss_points] == [1, 2, 3, 4]
    active = [s for s in seen if s[0]["active"]]
    assert active, "the host's progress endpoint never saw our task"
    assert any(0 < s[0]["progress"] < 1 and s[2] == 4 and "loss" in (s[3] or "") for s in active)
    assert max(s[1] for s in active) >= 3  # job_no follows the steps
    assert host.shared.state.id_live_preview >= 1  # the preview became the host's current image
    assert f"task({job_id})" in host.progress.finished_tasks
    assert host.shared.state.job == "" and not host.shared.state.interrupted  # state handed back


def test_the_hosts_interrupt_stops_training_after_saving(webui):
    from extensions_lib.jobs.training import train_hypernetwork_file

    host, extension, data = webui
    runner = extension.runner
    job_id = runner.start(train_hypernetwork_file, _request(extension, data, steps=500, create_image_every=0),
                          title="Training hnet", panel="train_hypernetwork")
    _wait_for(lambda: runner.progress().step >= 2)
    host.shared.state.interrupt()  # the WebUI's own Interrupt button
    p = runner.wait(job_id, 300)
    assert p.state == "cancelled" and "interrupted from the WebUI" in p.message
    result = p.result
    assert result.cancelled and 2 <= result.step < 500
    assert (result.log_dir / "hypernetworks" / f"hnet-{result.step}.pt").is_file()  # what it had, saved
    assert result.resume_path is not None and result.resume_path.is_file()
    assert not host.shared.state.interrupted


def test_one_job_at_a_time_and_queued_behind_a_generation(webui):
    from extensions_lib.jobs.training import train_hypernetwork_file

    host, extension, data = webui
    runner = extension.runner
    with host.call_queue.queue_lock:  # a generation holds the GPU queue
        job_id = runner.start(train_hypernetwork_file, _request(extension, data), title="Training hnet",
                              panel="train_hypernetwork")
        _wait_for(lambda: host.progress.progressapi(f"task({job_id})")["queued"])
        assert runner.progress().state == "queued"
        with pytest.raises(Busy, match="waiting in the WebUI's queue"):
            runner.start(train_hypernetwork_file, _request(extension, data), title="again", panel="x")
        assert runner.interrupt()  # dropped before it starts
    p = runner.wait(job_id, 60)
    assert p.state == "cancelled" and "before it started" in p.message and p.step == 0
    assert not (host.data_dir / "textual_inversion").exists()  # it never ran: no log folder


def test_a_model_switch_stops_training_cleanly(webui, tiny_checkpoint):
    from extensions_lib.jobs.training import train_hypernetwork_file

    host, extension, data = webui
    runner = extension.runner
    first = host.sd_models.model_data.sd_model
    job_id = runner.start(train_hypernetwork_file, _request(extension, data, steps=500, create_image_every=0),
                          title="Training hnet", panel="train_hypernetwork")
    from webui_standin.ldm_standin import build_ldm

    other = build_ldm(tiny_checkpoint("sd2"))
    _wait_for(lambda: runner.progress().step >= 1)
    host.sd_models.switch_to_cached(other)  # a checkpoint from the RAM cache: no callback fires
    p = runner.wait(job_id, 300)
    assert p.state == "cancelled" and "another checkpoint was selected" in p.message
    assert p.result.cancelled and p.result.resume_path.is_file()
    assert (p.result.log_dir / "hypernetworks" / f"hnet-{p.result.step}.pt").is_file()
    assert host.sd_models.model_data.sd_model is other is not first


def test_a_failing_job_reports_why_and_frees_the_runner(webui):
    from extensions_lib.jobs.training import train_hypernetwork_file

    host, extension, data = webui
    runner = extension.runner
    p = runner.wait(runner.start(train_hypernetwork_file, _request(extension, data, hypernetwork_name="missing"),
                                 title="Training missing", panel="train_hypernetwork"), 60)
    assert p.state == "failed" and "missing" in p.error
    p = runner.wait(runner.start(train_hypernetwork_file, _request(extension, data, steps=1, create_image_every=0),
                                 title="Training hnet", panel="train_hypernetwork"), 300)
    assert p.state == "done"


def test_embedding_created_and_trained_under_medvram_reaches_the_hosts_prompts(tmp_path, tiny_checkpoint):
    from extensions_lib.embeddings.options import CreateEmbeddingOptions, EmbeddingTrainOptions
    from extensions_lib.jobs.training import (CreateRequest, TrainRequest, create_embedding_file,
                                                 train_embedding_file)

    with standin_host(tmp_path, medvram=True) as host:
        extension = _extension(host)
        model = host.load_model(tiny_checkpoint("sd1"))
        data = make_folder(tmp_path / "data", n=2, size=(64, 64))
        runner = extension.runner
        created = runner.wait(runner.start(
            create_embedding_file, CreateRequest(CreateEmbeddingOptions(name="zqxstyle", init_text="cat"),
                                                          extension.context()),
            title="Creating zqxstyle", panel="create_embedding"), 60)
        assert created.state == "done", created.error
        db = host.sd_hijack.model_hijack.embedding_db
        start = db.word_embeddings["zqxstyle"].vec.clone()  # the host saw the new file at once
        with torch.no_grad():
            host.lowvram.send_everything_to_cpu()
            host.lowvram._bring(model.cond_stage_model.wrapped)
            cat = model.cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight[2368]
        assert torch.equal(start[0], cat)  # initialised from the token "cat" (id 2368)

        options = EmbeddingTrainOptions(embedding_name="zqxstyle", data_root=str(data), training_width=64,
                                        training_height=64, steps=2, save_every=0, create_image_every=0, seed=3,
                                        template_file="subject")
        trained = runner.wait(runner.start(train_embedding_file, TrainRequest(options, extension.context()),
                                           title="Training zqxstyle", panel="train_embedding"), 300)
        assert trained.state == "done", trained.error
        after = db.word_embeddings["zqxstyle"]
        assert after.step == 2 and not torch.equal(after.vec, start)  # reloaded with the trained vectors
