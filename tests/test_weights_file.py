"""Published weight files: safetensors as they are; pickles through the restricted loader, unwrapped from
{"state_dict": ...}, DataParallel's ``module.`` prefix dropped; anything else refused naming the file."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from extensions_lib.errors import AlchemyError
from extensions_lib.weights_file import read_state_dict


def test_read_state_dict_forms(tmp_path):
    w = {"a.weight": torch.arange(4.0), "b.bias": torch.ones(2)}
    save_file(w, str(tmp_path / "m.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in w.items()}, "epoch": 3}, tmp_path / "m.pt")
    torch.save(w, tmp_path / "plain.bin")
    for name in ("m.safetensors", "m.pt", "plain.bin"):
        got = read_state_dict(tmp_path / name, "what", "fix")
        assert got.keys() == w.keys() and all(torch.equal(got[k], w[k]) for k in w), name
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(AlchemyError) as err:
        read_state_dict(tmp_path / "list.pt", "not a state dict", "use the right file")
    assert str(tmp_path / "list.pt") in str(err.value) and "use the right file" in str(err.value)
