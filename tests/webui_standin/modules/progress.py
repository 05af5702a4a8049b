"""Stand-in for ``modules/progress.py`` (v1.10.1): the task queue the progress endpoint reports on."""
from __future__ import annotations

import time
from collections import OrderedDict

current_task = None
pending_tasks = OrderedDict()
finished_tasks = []
recorded_results = []


def start_task(id_task):
    global current_task
    current_task = id_task
    pending_tasks.pop(id_task, None)


def finish_task(id_task):
    global current_task
    if current_task == id_task:
        current_task = None
    finished_tasks.append(id_task)


def create_task_id(task_type):
    return f"task({task_type}-{time.time_ns()})"


def record_results(id_task, res):
    recorded_results.append((id_task, res))


def add_task_to_queue(id_job):
    pending_tasks[id_job] = time.time()


def progressapi(id_task, id_live_preview=-1):
    """What ``POST /internal/progress`` answers (as a dict)."""
    from modules import shared

    active = id_task == current_task
    queued = id_task in pending_tasks
    completed = id_task in finished_tasks
    if not active:
        return dict(active=False, queued=queued, completed=completed, id_live_preview=-1,
                    textinfo="In queue..." if queued else "Waiting...")
    state = shared.state
    progress = 0
    if state.job_count > 0:
        progress += state.job_no / state.job_count
    if state.sampling_steps > 0 and state.job_count > 0:
        progress += 1 / state.job_count * state.sampling_step / state.sampling_steps
    progress = min(progress, 1)
    elapsed = time.time() - state.time_start
    predicted = elapsed / progress if progress > 0 else None
    eta = predicted - elapsed if predicted is not None else None
    live_preview = None
    if state.id_live_preview != id_live_preview and state.current_image is not None:
        live_preview = state.current_image
        id_live_preview = state.id_live_preview
    return dict(active=True, queued=queued, completed=completed, progress=progress, eta=eta,
                live_preview=live_preview, id_live_preview=id_live_preview, textinfo=state.textinfo)
