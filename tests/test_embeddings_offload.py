"""Moving a frozen module out of memory during training and back, bit for bit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from extensions_lib.train.offload import Offload, offloaded


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.lin16 = nn.Linear(4, 2).to(torch.float16)
        self.register_buffer("steps", torch.arange(5))
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.tied = self.conv  # the same module twice: its tensors are stored once


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in [*module.named_parameters(), *module.named_buffers()]}


def test_offloaded_module_holds_no_memory_and_comes_back_bit_identical(tmp_path):
    block = Block()
    before = snapshot(block)
    params = {name: p for name, p in block.named_parameters()}
    x = torch.randn(1, 3, 5, 5)
    expected = block.conv(x)
    with offloaded(block, tmp_path) as offload:
        assert not offload.present
        assert all(t.numel() == 0 for t in [*block.parameters(), *block.buffers()])
        assert len(list(tmp_path.iterdir())) == 1
        with offload.present_for():
            assert torch.equal(block.conv(x), expected)
        assert block.conv.weight.numel() == 0
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone
    after = snapshot(block)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name
    assert all(p is params[name] for name, p in block.named_parameters())  # same Parameter objects
    assert torch.equal(block.conv(x), expected)


def test_module_comes_back_when_the_block_fails(tmp_path):
    block = Block()
    before = snapshot(block)
    with pytest.raises(RuntimeError, match="boom"), offloaded(block, tmp_path):
        raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in snapshot(block).items())


def test_offload_can_go_back_and_forth_and_none_is_a_no_op(tmp_path):
    block = Block()
    before = snapshot(block)
    offload = Offload(block, tmp_path)
    for _ in range(3):
        offload.move_away()
        offload.move_away()  # idempotent
        assert block.lin16.weight.numel() == 0
        offload.put_back()
        offload.put_back()
    assert all(torch.equal(v, before[k]) for k, v in snapshot(block).items())
    with offloaded(None) as nothing:
        assert nothing is None


def test_training_stand_ins_encode_exactly_like_the_full_model(tiny_model):
    """With the VAE and the token-embedding matrix away (as during training), encodings are unchanged."""
    from extensions_lib.embeddings.matcher import EmbeddingMatcher
    from extensions_lib.embeddings.session import unused_parts
    from extensions_lib.embeddings.patch import patch_text_encoders
    from extensions_lib.formats.embedding import Embedding
    from extensions_lib.prompt import encode_prompts

    adapter = tiny_model("sd1")
    table = adapter.text_encoder.text_model.embeddings.token_embedding
    before = {"table": table.weight.detach().clone(), **{k: v.detach().clone() for k, v in adapter.vae.state_dict().items()}}
    emb = Embedding("zqxrows", torch.randn(2, 32, generator=torch.Generator().manual_seed(1)))
    matcher = EmbeddingMatcher(adapter.tokenizer, [emb])
    first, second = ["a photo of zqxrows, red"], ["zqxrows BREAK (blue cat:1.2), green hat"]
    with torch.no_grad(), patch_text_encoders(adapter) as patch:
        expected = [encode_prompts(adapter, p, matcher=matcher) for p in (first, second)]
        away = unused_parts(adapter, patch)
        away.move_away()
        try:
            assert table.weight.numel() == 0 and all(p.numel() == 0 for p in adapter.vae.parameters())
            assert torch.equal(encode_prompts(adapter, first, matcher=matcher), expected[0])
            assert torch.equal(encode_prompts(adapter, second, matcher=matcher), expected[1])  # rows fetched anew
            with away.present_for():
                assert table.weight.numel() == before["table"].numel()
                assert torch.equal(encode_prompts(adapter, second, matcher=matcher), expected[1])
            assert table.weight.numel() == 0
        finally:
            away.put_back()
    assert torch.equal(table.weight, before["table"])
    assert all(torch.equal(v, before[k]) for k, v in adapter.vae.state_dict().items())


class _RecordingLibc:
    """Stands in for glibc: records the allocator settings a block makes."""

    def __init__(self, accepts: bool = True):
        self.calls = []
        self.accepts = accepts

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1 if self.accepts else 0

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


# The effect itself (page faults per training step) depends on glibc's arena reuse between threads and on
# whatever the process allocated before, so it is measured by bench/bench_textual_inversion.py, not here;
# these tests pin down what the block asks of the allocator and that it always sets the default back.
def test_keeping_freed_memory_raises_the_top_pad_for_the_block_and_restores_the_default(monkeypatch):
    from extensions_lib.train import cpu_memory

    libc = _RecordingLibc()
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: libc)
    monkeypatch.delenv("MALLOC_TOP_PAD_", raising=False)
    with pytest.raises(RuntimeError):
        with cpu_memory.keeping_freed_memory() as active:
            assert active
            assert libc.calls == [("mallopt", cpu_memory.M_TOP_PAD, cpu_memory.TRAINING_TOP_PAD)]
            raise RuntimeError("training failed")
    assert libc.calls[1:] == [("mallopt", cpu_memory.M_TOP_PAD, cpu_memory.DEFAULT_TOP_PAD), ("malloc_trim", 0)]


def test_keeping_freed_memory_restores_the_environments_pad_and_is_a_no_op_without_glibc(monkeypatch):
    from extensions_lib.train import cpu_memory

    libc = _RecordingLibc()
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: libc)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "65536")
    with cpu_memory.keeping_freed_memory(pad=1 << 20):
        pass
    assert [c[2] for c in libc.calls if c[0] == "mallopt"] == [1 << 20, 65536]

    refused = _RecordingLibc(accepts=False)
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: refused)
    with cpu_memory.keeping_freed_memory() as active:
        assert not active
    assert refused.calls == [("mallopt", cpu_memory.M_TOP_PAD, cpu_memory.TRAINING_TOP_PAD)]

    monkeypatch.setattr(cpu_memory, "_glibc", lambda: None)
    with cpu_memory.keeping_freed_memory() as active:
        assert not active


def test_reusing_call_buffers_for_sampling_restores_the_environments_thresholds_even_when_the_block_fails(monkeypatch):
    from extensions_lib.train import cpu_memory

    libc = _RecordingLibc()
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: libc)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with pytest.raises(RuntimeError):
        with cpu_memory.reusing_call_buffers():
            raise RuntimeError("sampling failed")
    assert libc.calls[2:] == [("mallopt", cpu_memory.M_MMAP_THRESHOLD, cpu_memory.DEFAULT_THRESHOLD),
                              ("mallopt", cpu_memory.M_TRIM_THRESHOLD, 65536), ("malloc_trim", 0)]
