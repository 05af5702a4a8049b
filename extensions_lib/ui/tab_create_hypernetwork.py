"""The "Create hypernetwork" sub-tab, as the WebUI's (same options, defaults and checks)."""
from __future__ import annotations

from ..hypernetworks.create import create_hypernetwork
from ..hypernetworks.options import CreateHypernetworkOptions
from ..jobs.context import UIContext
from .create_tab import build_create_tab

PANEL = "create_hypernetwork"


def create_file(options: CreateHypernetworkOptions, context: UIContext) -> str:
    """Write the new hypernetwork into the hypernetworks folder; the message the tab shows."""
    path = create_hypernetwork(options, context.hypernetworks_dir)
    context.files_changed("hypernetworks")
    return f"Created: {path}"


def build_create_hypernetwork(context: UIContext) -> None:
    """Render the tab's contents into the current gradio Blocks/Tab (no job runner: creating is instant
    and does not touch the model)."""
    build_create_tab(context, panel=PANEL, noun="hypernetwork", options_cls=CreateHypernetworkOptions,
                     create=lambda options: create_file(options, context))
