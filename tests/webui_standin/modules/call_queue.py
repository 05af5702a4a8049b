"""Stand-in for ``modules/call_queue.py`` (v1.10.1): one FIFO lock for all GPU work, and the wrappers."""
from __future__ import annotations

import html
import threading
import time
from functools import wraps

from modules import errors, progress, shared

queue_lock = threading.Lock()


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            res = func(*args, **kwargs)
        return res
    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    name = func.__name__

    @wraps(func)
    def f(*args, **kwargs):
        # if the first argument is a string that says "task(...)", it is treated as a job id
        if args and type(args[0]) == str and args[0].startswith("task(") and args[0].endswith(")"):
            id_task = args[0]
            progress.add_task_to_queue(id_task)
        else:
            id_task = None

        with queue_lock:
            shared.state.begin(job=id_task)
            progress.start_task(id_task)
            try:
                res = func(*args, **kwargs)
                progress.record_results(id_task, res)
            finally:
                progress.finish_task(id_task)
            shared.state.end()
        return res

    return wrap_gradio_call(f, extra_outputs=extra_outputs, add_stats=True, name=name)


def wrap_gradio_call(func, extra_outputs=None, add_stats=False, name=None):
    @wraps(func)
    def f(*args, **kwargs):
        try:
            res = func(*args, **kwargs)
        finally:
            shared.state.skipped = False
            shared.state.interrupted = False
            shared.state.stopping_generation = False
            shared.state.job_count = 0
            shared.state.job = ""
        return res
    return wrap_gradio_call_no_job(f, extra_outputs, add_stats, name)


def wrap_gradio_call_no_job(func, extra_outputs=None, add_stats=False, name=None):
    @wraps(func)
    def f(*args, extra_outputs_array=extra_outputs, **kwargs):
        t = time.perf_counter()
        try:
            res = list(func(*args, **kwargs))
        except Exception as e:
            errors.report(f"Error completing request ({name})", exc_info=True)
            if extra_outputs_array is None:
                extra_outputs_array = [None, '']
            error_message = f'{type(e).__name__}: {e}'
            res = extra_outputs_array + [f"<div class='error'>{html.escape(error_message)}</div>"]
        if not add_stats:
            return tuple(res)
        elapsed = time.perf_counter() - t
        res[-1] += f"<div class='performance'><p class='time'>Time taken: <wbr><span class='measurement'>{elapsed:.1f} sec.</span></p></div>"
        return tuple(res)
    return f
