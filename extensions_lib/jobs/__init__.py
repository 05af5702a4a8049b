"""Long-running work as jobs, without gradio: what the tabs, the WebUI glue and the HTTP API all run.

- ``progress``: a job's progress (``JobProgress``), the board it is published on, the ``JobContext`` a job
  function reports to, and the ``JobRunner`` interface.
- ``thread_runner``: the standalone runner (one job at a time on a thread); the WebUI's runner over its GPU
  queue is ``host.jobs.HostJobRunner``.
- ``context``: ``UIContext``, the host as jobs and tabs see it (model getter, folders, hooks, defaults).
- ``training`` / ``dataset`` / ``generate``: the job functions, ``fn(request, job)`` with a request dataclass.
- ``routes``: the progress routes ``javascript/alchemy.js`` polls.
"""
