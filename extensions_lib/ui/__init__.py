"""Gradio (3.41) tabs shared by the WebUI extension and the standalone ``alchemy ui``.

Builders render into the *currently open* ``gr.Blocks`` / ``gr.Tab`` and wire their own events; they
return nothing. Each takes a :class:`~.progress.JobRunner` (how long jobs run: the standalone
:class:`~.thread_runner.ThreadJobRunner`, or the WebUI glue's runner over the host's GPU queue and
``shared.state``) and a :class:`~.context.UIContext` (the model getter, our folders, host hooks)::

    build_train_tabs(runner, context, title_prefix="")   # one gr.Tab per training sub-tab, call inside gr.Tabs
    build_dataset_tabs(runner, context)                  # tagger + preprocess gr.Tab's, call inside gr.Tabs

    # or one tab's contents at a time (call inside a gr.Tab / gr.Blocks):
    tab_create_embedding.build_create_embedding(runner, context)
    tab_train_embedding.build_train_embedding(runner, context)
    tab_create_hypernetwork.build_create_hypernetwork(context)
    tab_train_hypernetwork.build_train_hypernetwork(runner, context)
    tab_tagger.build_tagger(runner, context)
    tab_preprocess.build_preprocess(runner, context)
    tab_txt2img.build_txt2img(runner, context)            # standalone only (the WebUI has its own txt2img)

A tab whose key ("create_embedding", "train_embedding", "create_hypernetwork", "train_hypernetwork",
"tagger", "preprocess", "txt2img") is in ``context.unsupported`` shows that reason instead of its controls.

Progress: ``javascript/alchemy.js`` polls ``GET alchemy/progress`` and ``GET alchemy/progress/preview``;
add them to the server with :func:`.routes.add_progress_routes(app, runner)` (the WebUI glue: in
``on_app_started``). The JSON is :func:`.progress.progress_payload`; element ids are ``alchemy_*``.

The jobs themselves (``dataset_jobs``, ``training_jobs``, ``generate_job``) do not
need gradio: ``fn(request, job)`` with a request dataclass, so the HTTP API can run the same processing.
"""
from __future__ import annotations

from .context import UIContext
from .progress import JobContext, JobProgress, JobRunner, progress_payload, run_job
from .thread_runner import ThreadJobRunner

__all__ = ["UIContext", "JobContext", "JobProgress", "JobRunner", "ThreadJobRunner", "progress_payload", "run_job",
           "build_train_tabs", "build_dataset_tabs"]


def build_train_tabs(runner: JobRunner, context: UIContext, title_prefix: str = "") -> None:
    """Our training sub-tabs, each a ``gr.Tab``: call inside an open ``gr.Tabs`` (the WebUI's Train tab)."""
    import gradio as gr

    from .tab_create_embedding import build_create_embedding
    from .tab_create_hypernetwork import build_create_hypernetwork
    from .tab_train_embedding import build_train_embedding
    from .tab_train_hypernetwork import build_train_hypernetwork

    with gr.Tab(f"{title_prefix}Create embedding", id="alchemy_create_embedding_tab",
                elem_id="alchemy_create_embedding_tab"):
        build_create_embedding(runner, context)
    with gr.Tab(f"{title_prefix}Create hypernetwork", id="alchemy_create_hypernetwork_tab",
                elem_id="alchemy_create_hypernetwork_tab"):
        build_create_hypernetwork(context)
    with gr.Tab(f"{title_prefix}Train embedding", id="alchemy_train_embedding_tab",
                elem_id="alchemy_train_embedding_tab"):
        build_train_embedding(runner, context)
    with gr.Tab(f"{title_prefix}Train hypernetwork", id="alchemy_train_hypernetwork_tab",
                elem_id="alchemy_train_hypernetwork_tab"):
        build_train_hypernetwork(runner, context)


def build_dataset_tabs(runner: JobRunner, context: UIContext) -> None:
    """The tagger and preprocessing tabs, each a ``gr.Tab``: call inside an open ``gr.Tabs``."""
    import gradio as gr

    from .tab_preprocess import build_preprocess
    from .tab_tagger import build_tagger

    with gr.Tab("Tagger", id="alchemy_tagger_tab", elem_id="alchemy_tagger_tab"):
        build_tagger(runner, context)
    with gr.Tab("Preprocess", id="alchemy_preprocess_tab", elem_id="alchemy_preprocess_tab"):
        build_preprocess(runner, context)
    from .tab_captions import build_captions

    with gr.Tab("Captions", id="alchemy_captions_tab", elem_id="alchemy_captions_tab"):
        build_captions(runner, context)
