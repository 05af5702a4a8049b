"""DeepDanbooru in torch: the resnet_custom_v3 network as the WebUI's torch port lays it out.

The WebUI loads `models/torch_deepdanbooru/model-resnet_custom_v3.pt`, a state dict whose 179
convolutions are named `n_Conv_0` ... `n_Conv_178` in graph order (BatchNorm already folded into
the conv biases), with the tag names stored under the key `tags`. This module rebuilds that network
from a block plan instead of spelling out 179 layers, so the same code loads the real checkpoint and
a test-sized one: only the channel widths and the number of tags are read from the weights, the
layout (stage repeats, conv numbering, TensorFlow "same" padding) is fixed.

Layout facts (from the converted Keras graph): a 7x7/2 stem conv and a 3x3/2 max-pool, then six
stages of bottleneck blocks (1x1 -> 3x3 -> 1x1, width/4 inside) with widths 256, 512, 1024, 1024,
2048, 4096. Each stage opens with a projection block (1x1 shortcut conv, stride 2 except in the
first stage) followed by 2, 7, 19, 19, 2, 2 identity blocks. The projection shortcut is numbered
before the block's main branch, except in the fourth stage (1024 -> 1024) where it comes after.
A bias-free 1x1 conv to the tag count, a global average pool and a sigmoid finish it. Input:
NHWC float RGB in 0..1, 512 x 512.
"""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import AlchemyError
from .base import make_model_id
from .labels import deepdanbooru_labels
from .options import DEEPDANBOORU_THRESHOLDS
from .preprocess import deepdanbooru_input

STAGE_WIDTHS = (256, 512, 1024, 1024, 2048, 4096)
STAGE_REPEATS = (2, 7, 19, 19, 2, 2)       # identity blocks after each stage's projection block
SHORTCUT_AFTER_MAIN = frozenset({3})       # stages whose shortcut conv is numbered after the main branch
STEM_WIDTH = 64
N_TAGS = 9176
INPUT_SIZE = 512
CHECKPOINT_SUFFIXES = (".pt", ".safetensors")


@dataclass(frozen=True)
class Block:
    """Conv indices of one bottleneck block; `shortcut` is None for an identity block."""

    reduce: int
    spatial: int
    expand: int
    shortcut: int | None
    stride: int


def block_plan(repeats: Sequence[int] = STAGE_REPEATS) -> list[list[Block]]:
    """The blocks of each stage with their `n_Conv_<i>` numbers (0 is the stem, the last + 1 the head)."""
    stages: list[list[Block]] = []
    i = 1
    for stage, identity_blocks in enumerate(repeats):
        stride = 1 if stage == 0 else 2
        if stage in SHORTCUT_AFTER_MAIN:
            first = Block(i, i + 1, i + 2, i + 3, stride)
        else:
            first = Block(i + 1, i + 2, i + 3, i, stride)
        i += 4
        blocks = [first]
        for _ in range(identity_blocks):
            blocks.append(Block(i, i + 1, i + 2, None, 1))
            i += 3
        stages.append(blocks)
    return stages


def head_index(plan: list[list[Block]]) -> int:
    return max(max(b.reduce, b.spatial, b.expand, b.shortcut or 0) for s in plan for b in s) + 1


class DeepDanbooruNet(nn.Module):
    """resnet_custom_v3 with the WebUI port's parameter names; `forward` takes NHWC RGB 0..1."""

    def __init__(self, n_tags: int = N_TAGS, stem_width: int = STEM_WIDTH,
                 widths: Sequence[int] = STAGE_WIDTHS, tags: Sequence[str] = ()):
        super().__init__()
        self.plan = block_plan()
        self.tags = list(tags)
        convs: dict[int, nn.Conv2d] = {0: nn.Conv2d(3, stem_width, 7, stride=2)}
        channels = stem_width
        for width, blocks in zip(widths, self.plan):
            mid = width // 4
            for block in blocks:
                convs[block.reduce] = nn.Conv2d(channels, mid, 1)
                convs[block.spatial] = nn.Conv2d(mid, mid, 3, stride=block.stride)
                convs[block.expand] = nn.Conv2d(mid, width, 1)
                if block.shortcut is not None:
                    convs[block.shortcut] = nn.Conv2d(channels, width, 1, stride=block.stride)
                channels = width
        convs[head_index(self.plan)] = nn.Conv2d(channels, n_tags, 1, bias=False)
        for index in sorted(convs):  # registration order = state-dict order of the original
            self.add_module(f"n_Conv_{index}", convs[index])
            if index == 0:
                self.n_MaxPool_0 = nn.MaxPool2d(3, stride=2)

    def conv(self, index: int) -> nn.Conv2d:
        return getattr(self, f"n_Conv_{index}")

    def _block(self, x: torch.Tensor, block: Block) -> torch.Tensor:
        # TensorFlow "same" padding on even sizes: symmetric for stride 1, bottom/right only for stride 2.
        pad = (1, 1, 1, 1) if block.stride == 1 else (0, 1, 0, 1)
        h = F.relu(self.conv(block.reduce)(x))
        h = F.relu(self.conv(block.spatial)(F.pad(h, pad)))
        h = self.conv(block.expand)(h)
        skip = x if block.shortcut is None else self.conv(block.shortcut)(x)
        return F.relu(h + skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        x = F.relu(self.conv(0)(F.pad(x, (2, 3, 2, 3))))
        x = self.n_MaxPool_0(F.pad(x, (0, 1, 0, 1), value=float("-inf")))
        for blocks in self.plan:
            for block in blocks:
                x = self._block(x, block)
        x = self.conv(head_index(self.plan))(x)
        return torch.sigmoid(x.mean(dim=(2, 3)))


def _widths_from_state(state: dict, path: Path) -> tuple[int, tuple[int, ...], int]:
    plan = block_plan()
    expected = {f"n_Conv_{i}.weight" for i in range(head_index(plan) + 1)}
    missing = sorted(expected - set(state), key=lambda k: int(k.split("_")[2].split(".")[0]))
    if missing:
        raise AlchemyError(f"not a resnet_custom_v3 DeepDanbooru checkpoint (missing {missing[0]} and "
                           f"{len(missing) - 1} more)", path,
                           "use model-resnet_custom_v3.pt from the WebUI's TorchDeepDanbooru release")
    stem = int(state["n_Conv_0.weight"].shape[0])
    widths = tuple(int(state[f"n_Conv_{blocks[0].expand}.weight"].shape[0]) for blocks in plan)
    n_tags = int(state[f"n_Conv_{head_index(plan)}.weight"].shape[0])
    return stem, widths, n_tags


def read_checkpoint(path: str | Path) -> tuple[dict, list[str]]:
    """(state dict of tensors, tag names) from a `.pt` (restricted unpickler) or `.safetensors` file.

    Tags come from the state dict's `tags` entry (the WebUI's `.pt`), the safetensors metadata key
    `tags` (a JSON list), or a `tags.txt` beside the file (one tag per line, DeepDanbooru projects).
    """
    path = Path(path)
    tags: list[str] | None = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                state = {k: fh.get_tensor(k) for k in fh.keys()}
                meta = fh.metadata() or {}
        except Exception as exc:
            raise AlchemyError(f"cannot read the safetensors file ({exc})", path,
                               "download or convert the checkpoint again") from None
        if "tags" in meta:
            tags = json.loads(meta["tags"])
    else:
        from ..safe_pickle import safe_load

        state = safe_load(path)
        if not isinstance(state, dict):
            raise AlchemyError(f"checkpoint holds a {type(state).__name__}, not a state dict", path,
                               "use model-resnet_custom_v3.pt from the WebUI's TorchDeepDanbooru release")
        state = dict(state)
        if "tags" in state:
            tags = [str(t) for t in state.pop("tags")]
    if tags is None:
        tags_txt = path.with_name("tags.txt")
        if not tags_txt.is_file():
            raise AlchemyError("checkpoint carries no tag list", path,
                               f"put the model's tag list, one tag per line, in {tags_txt}")
        tags = [line.strip() for line in tags_txt.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, tags


def load_deepdanbooru(path: str | Path) -> DeepDanbooruNet:
    """The network with its weights and `.tags`, in eval mode on the CPU."""
    path = Path(path)
    state, tags = read_checkpoint(path)
    stem, widths, n_tags = _widths_from_state(state, path)
    if len(tags) != n_tags:
        raise AlchemyError(f"the tag list has {len(tags)} entries but the model has {n_tags} outputs", path,
                           "use the tag list that belongs to this checkpoint")
    net = DeepDanbooruNet(n_tags, stem, widths, tags)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise AlchemyError(f"weights do not fit resnet_custom_v3: {str(exc).splitlines()[0]}", path,
                           "use model-resnet_custom_v3.pt from the WebUI's TorchDeepDanbooru release") from None
    return net.eval().float()


def find_deepdanbooru_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint file in a DeepDanbooru folder (the WebUI's file name first), or None."""
    folder = Path(folder)
    preferred = folder / "model-resnet_custom_v3.pt"
    if preferred.is_file():
        return preferred
    found = sorted(p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file()) \
        if folder.is_dir() else []
    return found[0] if len(found) == 1 else None


def _pick_device(device: str, device_id: int) -> torch.device:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise AlchemyError("CUDA was requested but torch sees no GPU", fix="use --device cpu")
        return torch.device("cuda", device_id)
    return torch.device("cpu")


class DeepDanbooruTagger:
    """A loaded DeepDanbooru checkpoint behind the common tagger interface."""

    kind = "deepdanbooru"
    default_thresholds = DEEPDANBOORU_THRESHOLDS
    fixed_batch = None
    input_size = INPUT_SIZE

    def __init__(self, path: str | Path, *, device: str = "auto", device_id: int = 0,
                 report: Callable[[str], None] | None = None):
        path = Path(path)
        checkpoint = find_deepdanbooru_checkpoint(path) if path.is_dir() else path
        if checkpoint is None or not checkpoint.is_file():
            raise AlchemyError("no DeepDanbooru checkpoint found", path,
                               "put model-resnet_custom_v3.pt (from the WebUI's TorchDeepDanbooru release) in it")
        self.checkpoint = checkpoint
        self.name = checkpoint.parent.name if path.is_dir() else checkpoint.stem
        self.device = _pick_device(device, device_id)
        self.model: DeepDanbooruNet | None = load_deepdanbooru(checkpoint).to(self.device)
        self.labels = deepdanbooru_labels(self.model.tags)
        id_files = [checkpoint] + ([checkpoint.with_name("tags.txt")] if checkpoint.with_name("tags.txt").is_file()
                                   else [])
        self.model_id = make_model_id(self.kind, id_files)
        if report:
            report(f"DeepDanbooru: {len(self.labels)} tags on {self.device}")

    parallel_runs = 1  # torch spreads one call over every core itself

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def prepare(self, image: Image.Image) -> np.ndarray:
        return deepdanbooru_input(image, self.input_size)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if self.model is None:
            raise AlchemyError("the tagger was unloaded", self.checkpoint, "load it again")
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            return self.model(x).float().cpu().numpy()

    def unload(self) -> None:
        """Drop the network; on a GPU also return the cached blocks to the driver."""
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
