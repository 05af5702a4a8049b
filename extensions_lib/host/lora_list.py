"""Make the WebUI's built-in Lora extension see a LoRA file we just wrote.

The extension keeps its list of files (``networks.available_networks``) until its refresh button or a
prompt naming an unknown network; after training we ask it to rescan. Its ``networks`` module is
importable only inside a WebUI whose Lora extension loaded (it was imported by the extension's script),
so it is taken from ``sys.modules``, never imported here: another package of that name must not be picked
up, and an absent or disabled extension is simply skipped.
"""
from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


def refresh_host_lora_list(modules: dict | None = None) -> bool:
    """Rescan the host's Lora folder; False when the built-in Lora extension is not loaded."""
    networks = (sys.modules if modules is None else modules).get("networks")
    rescan = getattr(networks, "list_available_networks", None)
    if not callable(rescan) or not isinstance(getattr(networks, "available_networks", None), dict):
        return False
    try:
        rescan()
    except Exception:  # noqa: BLE001 — a failing rescan must not fail the finished training job
        log.exception("Alchemy: the Lora extension could not rescan its folder")
        return False
    return True
