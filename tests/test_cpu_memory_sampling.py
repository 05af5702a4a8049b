"""reusing_call_buffers: the allocator settings asked for a sampling run, and set back afterwards."""
from __future__ import annotations

import pytest

from extensions_lib.train import cpu_memory

# The effect (page faults per UNet call) depends on everything the process allocated before, so it is
# measured by bench/bench_txt2img.py, not here; this pins down what the block asks and that it sets back.


class _RecordingLibc:
    def __init__(self, accepts=True):
        self.calls, self.accepts = [], accepts

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return int(self.accepts)

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_reusing_call_buffers_restores_the_environments_thresholds_even_when_the_block_fails(monkeypatch):
    libc = _RecordingLibc()
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: libc)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with pytest.raises(RuntimeError):
        with cpu_memory.reusing_call_buffers():
            raise RuntimeError("sampling failed")
    assert libc.calls[2:] == [("mallopt", cpu_memory.M_MMAP_THRESHOLD, cpu_memory.DEFAULT_THRESHOLD),
                              ("mallopt", cpu_memory.M_TRIM_THRESHOLD, 65536), ("malloc_trim", 0)]
