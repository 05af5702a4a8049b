"""Tiny face-detector ONNX files with the real models' interfaces, built with the onnx helper (no downloads).

- YuNet-shaped: input ``input`` (1, 3, H, W), BGR 0..255 as cv2.FaceDetectorYN feeds it; outputs cls/obj/bbox/
  kps at strides 8, 16, 32 with YuNet's names and shapes (1, N, 1|1|4|10). Only the stride-32 head answers:
  a cell scores high where the blue channel (index 0 in BGR) beats the red one, so a blue square is a
  "face" only when the channels arrive in BGR order.
- YOLOv8-shaped (deepghs anime detector): input ``images`` (1, 3, 64, 64) RGB/255, output ``output0``
  (1, 5, 4): centre-x, centre-y, w, h of the four 32-px cells and a "face" score that is high on red cells;
  metadata ``imgsz`` and ``names`` as ultralytics writes them.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _save(graph, path, metadata=None):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_yunet_like(path):
    nodes, inits, outputs = [], [], []
    for s in (8, 16, 32):
        nodes.append(helper.make_node("AveragePool", ["input"], [f"pool{s}"], kernel_shape=[s, s], strides=[s, s]))
        weight = [[[[0.1]], [[0.0]], [[-0.1]]]] if s == 32 else [[[[0.0]], [[0.0]], [[0.0]]]]
        inits += [_init(f"wc{s}", weight), _init(f"bc{s}", [-5.0 if s == 32 else -20.0]),
                  _init(f"wb{s}", np.zeros((4, 3, 1, 1))), _init(f"bb{s}", [0.5, 0.5, 0.0, 0.0]),
                  _init(f"wk{s}", np.zeros((10, 3, 1, 1))), _init(f"bk{s}", np.zeros(10))]
        nodes += [helper.make_node("Conv", [f"pool{s}", f"wc{s}", f"bc{s}"], [f"logit{s}"], kernel_shape=[1, 1]),
                  helper.make_node("Sigmoid", [f"logit{s}"], [f"prob{s}"])]
        for head, source, width in (("cls", f"prob{s}", 1), ("obj", f"prob{s}", 1), ("bbox", None, 4), ("kps", None, 10)):
            src = source
            if src is None:
                w, b = ("wb", "bb") if head == "bbox" else ("wk", "bk")
                nodes.append(helper.make_node("Conv", [f"pool{s}", f"{w}{s}", f"{b}{s}"], [f"{head}raw{s}"], kernel_shape=[1, 1]))
                src = f"{head}raw{s}"
            inits.append(numpy_helper.from_array(np.array([1, -1, width], dtype=np.int64), f"shape_{head}{s}"))
            nodes += [helper.make_node("Transpose", [src], [f"{head}t{s}"], perm=[0, 2, 3, 1]),
                      helper.make_node("Reshape", [f"{head}t{s}", f"shape_{head}{s}"], [f"{head}_{s}"])]
            outputs.append((f"{head}_{s}", width))
    order = [f"{h}_{s}" for h in ("cls", "obj", "bbox", "kps") for s in (8, 16, 32)]
    widths = dict(outputs)
    graph = helper.make_graph(
        nodes, "yunet_like", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "N", widths[n]]) for n in order], inits)
    return _save(graph, path)


def make_yolov8_like(path):
    cx = [16, 48, 16, 48]
    cy = [16, 16, 48, 48]
    boxes = np.array([[cx, cy, [32] * 4, [32] * 4]], dtype=np.float32)  # (1, 4, 4)
    inits = [_init("w", [[[[40.0]], [[0.0]], [[-40.0]]]]), _init("b", [-5.0]), _init("boxes", boxes),
             numpy_helper.from_array(np.array([1, 1, 4], dtype=np.int64), "shape")]
    nodes = [helper.make_node("AveragePool", ["images"], ["pool"], kernel_shape=[32, 32], strides=[32, 32]),
             helper.make_node("Conv", ["pool", "w", "b"], ["logit"], kernel_shape=[1, 1]),
             helper.make_node("Sigmoid", ["logit"], ["prob"]),
             helper.make_node("Reshape", ["prob", "shape"], ["score"]),
             helper.make_node("Concat", ["boxes", "score"], ["output0"], axis=1)]
    graph = helper.make_graph(nodes, "yolov8_like",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 5, 4])], inits)
    return _save(graph, path, {"imgsz": "[64, 64]", "names": "{0: 'face'}"})
