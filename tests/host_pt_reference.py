"""An independent re-statement, for tests, of how a stock WebUI v1.10.1 vets and reads a `.pt`.

Written from the documented host facts (shared/reference/a1111-host.md 4.1 and 9, modules/safe.py's
allow-list), deliberately NOT using extensions_lib: it really unpickles data.pkl with the host's
find_class rules, then interprets the dict the way the host's embedding loader does.
"""
from __future__ import annotations

import os
import pickle
import re
import sys
import zipfile

import torch

HOST_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|\.data/serialization_id|(data\.pkl))$")
_HOST_ALLOWED = {
    "collections": {"OrderedDict"},
    "torch._utils": {"_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy"},
    "torch": {"FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage", "ByteStorage",
              "float32", "BFloat16Storage"},
    "torch.nn.modules.container": {"ParameterDict"},
    "numpy.core.multiarray": {"scalar", "_reconstruct"},
    "numpy": {"dtype", "ndarray"},
}


class HostUnpickler(pickle.Unpickler):
    """What the WebUI's safe.py does: really unpickle data.pkl, resolving only its allow-listed globals."""

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module, name):
        if name in _HOST_ALLOWED.get(module, ()):
            __import__(module)
            return getattr(sys.modules[module], name)
        if (module, name) == ("__builtin__", "set"):
            return set
        raise Exception(f"global '{module}/{name}' is forbidden")


def host_check_pt(path) -> None:
    """Raise like the host would; return quietly when the host would go on to torch.load the file."""
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if not HOST_NAMES.match(name):
                raise Exception(f"bad file inside {path}: {name}")
        pkls = [n for n in z.namelist() if n.endswith("/data.pkl")]
        assert len(pkls) == 1
        with z.open(pkls[0]) as fh:
            HostUnpickler(fh).load()


def host_embedding_from_data(data, name):
    """(name, vec, vectors, shape, step, sd_checkpoint, sd_checkpoint_name) by the host's rules."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        assert len(params) == 1, "embedding file has multiple terms in it"
        vec = next(iter(params.items()))[1].detach().to("cpu", dtype=torch.float32)
        shape, vectors = vec.shape[-1], vec.shape[0]
    elif type(data) == dict and "clip_g" in data and "clip_l" in data:  # noqa: E721 (host's exact test)
        vec = {k: v.detach().to("cpu", dtype=torch.float32) for k, v in data.items()}
        shape, vectors = data["clip_g"].shape[-1] + data["clip_l"].shape[-1], data["clip_g"].shape[0]
    elif type(data) == dict and type(next(iter(data.values()))) == torch.Tensor:  # noqa: E721
        assert len(data.keys()) == 1, "embedding file has multiple terms in it"
        emb = next(iter(data.values()))
        if len(emb.shape) == 1:
            emb = emb.unsqueeze(0)
        vec = emb.detach().to("cpu", dtype=torch.float32)
        shape, vectors = vec.shape[-1], vec.shape[0]
    else:
        raise Exception("Couldn't identify as neither textual inversion embedding nor diffuser concept.")
    return (name, vec, vectors, shape, data.get("step", None), data.get("sd_checkpoint", None),
            data.get("sd_checkpoint_name", None))


def host_read_pt_embedding(path):
    host_check_pt(path)
    data = torch.load(path, map_location="cpu", weights_only=False)
    return host_embedding_from_data(data, os.path.splitext(os.path.basename(path))[0])


def host_checksum(vec: torch.Tensor) -> str:
    def const_hash(a):
        r = 0
        for v in a:
            r = (r * 281 ^ int(v) * 997) & 0xFFFFFFFF
        return r

    return f"{const_hash(vec.reshape(-1) * 100) & 0xffff:04x}"
