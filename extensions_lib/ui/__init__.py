"""Gradio (3.41) tabs shared by the WebUI extension and the standalone ``alchemy ui``.

Builders render into the *currently open* ``gr.Blocks`` / ``gr.Tab`` and wire their own events; they
return nothing. Each takes a :class:`~extensions_lib.jobs.progress.JobRunner` (how long jobs run: the standalone
:class:`~extensions_lib.jobs.thread_runner.ThreadJobRunner`, or the WebUI glue's runner over the host's GPU
queue and ``shared.state``) and a :class:`~extensions_lib.jobs.context.UIContext` (the model getter, our
folders, host hooks)::

    build_train_tabs(runner, context, title_prefix="")   # one gr.Tab per training sub-tab, call inside gr.Tabs
    build_dataset_tabs(runner, context)                  # tagger + preprocess gr.Tab's, call inside gr.Tabs

    # or one tab's contents at a time (call inside a gr.Tab / gr.Blocks):
    create_tab.build_create_tab(runner, context, method)  # a registered method's "Create ..." tab
    tab_train_embedding.build_train_embedding(runner, context, method)
    tab_train_hypernetwork.build_train_hypernetwork(runner, context, method)
    tab_tagger.build_tagger(runner, context)
    tab_preprocess.build_preprocess(runner, context)
    tab_txt2img.build_txt2img(runner, context)            # standalone only (the WebUI has its own txt2img)

The training tabs come from the method registry (:mod:`extensions_lib.methods.registry`: ``method`` is a
``MethodSpec``). A tab whose key ("create_embedding", "train_embedding", "create_hypernetwork",
"train_hypernetwork", ``MethodSpec.create_panel``/``train_panel`` of other methods, "tagger", "preprocess",
"txt2img") is in ``context.unsupported`` shows that reason instead of its controls.

Progress: ``javascript/alchemy.js`` polls ``GET alchemy/progress`` and ``GET alchemy/progress/preview``;
add them to the server with :func:`extensions_lib.jobs.routes.add_progress_routes(app, runner)` (the WebUI
glue: in ``on_app_started``). The JSON is :func:`extensions_lib.jobs.progress.progress_payload`; element ids
are ``alchemy_*``.

The jobs themselves live in :mod:`extensions_lib.jobs` (no gradio): ``fn(request, job)`` with a request
dataclass, so the HTTP API can run the same processing.
"""
from __future__ import annotations

from ..jobs.context import UIContext
from ..jobs.progress import JobContext, JobProgress, JobRunner, progress_payload, run_job
from ..jobs.thread_runner import ThreadJobRunner

__all__ = ["UIContext", "JobContext", "JobProgress", "JobRunner", "ThreadJobRunner", "progress_payload", "run_job",
           "build_train_tabs", "build_dataset_tabs"]


def build_train_tabs(runner: JobRunner, context: UIContext, title_prefix: str = "") -> None:
    """The training sub-tabs of every registered method (:mod:`extensions_lib.methods.registry`), each a
    ``gr.Tab``: all "Create ..." tabs, then all "Train ..." tabs. Call inside an open ``gr.Tabs`` (the
    WebUI's Train tab)."""
    import gradio as gr

    from ..methods.registry import methods, resolve

    registered = methods()
    tabs = [(f"Create {m.noun}", m.create_panel, m.create_tab, m) for m in registered if m.create_panel]
    tabs += [(f"Train {m.noun}", m.train_panel, m.train_tab, m) for m in registered]
    for title, panel, builder, method in tabs:
        with gr.Tab(f"{title_prefix}{title}", id=f"alchemy_{panel}_tab", elem_id=f"alchemy_{panel}_tab"):
            resolve(builder)(runner, context, method)


def build_dataset_tabs(runner: JobRunner, context: UIContext) -> None:
    """The tagger and preprocessing tabs, each a ``gr.Tab``: call inside an open ``gr.Tabs``."""
    import gradio as gr

    from .tab_preprocess import build_preprocess
    from .tab_tagger import build_tagger

    with gr.Tab("Tagger", id="alchemy_tagger_tab", elem_id="alchemy_tagger_tab"):
        build_tagger(runner, context)
    with gr.Tab("Preprocess", id="alchemy_preprocess_tab", elem_id="alchemy_preprocess_tab"):
        build_preprocess(runner, context)
